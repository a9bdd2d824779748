"""A voice front end on a paced stream: tokens in, phrases of speech out, the listener's progress reported back.

Four steps run side by side for one answer:

1. **receive**: the answer streams from ``/v1/chat/completions`` with ``"tokenflow": {"rate": "listening",
   "pacing": "phrase"}``: the gateway sends whole phrases at the listener's rate, one event each, so each event
   is speakable at once. (With ``smooth`` or ``none`` pacing, tokens are grouped into phrases here, with the same
   rules: :class:`gateway.streams.phrasing.PhraseBuilder`.)
2. **synthesize**: each phrase, in order, becomes audio (:mod:`.tts`: espeak-ng), usually long before it plays;
3. **play**: the playback clock (:mod:`.playback`) plays the phrases back to back from their real durations;
   a phrase whose audio is not ready when the one before it ends is an underrun;
4. **report**: twice a second, ``POST /v1/streams/{id}/progress`` with the tokens heard so far, counted a
   synthesis lead ahead (a word must be synthesized before it plays), so the gateway paces and schedules the
   stream by the speech, not by how fast this client reads its socket.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.streams.phrasing import PhraseBuilder

from .playback import PlaybackClock
from .tts import Clip, Espeak

REPORT_EVERY_S = 0.5
# The pipeline consumes a word when it must hold it already: its synthesis latency (and a margin) before the word
# plays. Reporting progress that far ahead keeps the gateway resuming a paused stream in time for synthesis. It is
# a constant: a lead that moved would move the reported progress too, and the gateway would measure a wrong rate.
LEAD_S = 1.0
START_BUFFER_S = 1.0  # audio ready before playback starts (the first word alone is a fraction of a second)


@dataclass(slots=True)
class VoiceResult:
    stream_id: str | None = None
    requested: float = math.nan  # loop time of the request
    clock: PlaybackClock = field(default_factory=lambda: PlaybackClock(START_BUFFER_S))
    clips: list[Clip] = field(default_factory=list)
    reports: int = 0  # progress reports the gateway accepted
    rate_measured: float | None = None  # the gateway's measured rate, from its answer to the last report
    rate_effective: float | None = None
    rate_measured_at: float = math.nan  # when that report was sent
    progress: list[tuple[float, int, float | None]] = field(default_factory=list)  # (sent at, tokens, measured rate)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def first_audio_s(self) -> float:
        """From the request to the first sound."""
        return self.clock.phrases[0].start - self.requested if self.clock.phrases else math.nan


@dataclass(frozen=True, slots=True)
class _Phrase:
    text: str
    start: int
    end: int
    received: float


async def speak(session: aiohttp.ClientSession, url: str, prompt: str, *, model: str, tts: Espeak,
                rate: float | str = "listening", pacing: str = "phrase", max_tokens: int = 200,
                lead_s: float = LEAD_S, wait_playback: bool = False, result: VoiceResult | None = None) -> VoiceResult:
    """Stream one answer from the gateway at ``url`` and speak it; returns what was played and when.

    ``wait_playback``: return when the last phrase has played (in real time) rather than when it is synthesized.
    """
    loop = asyncio.get_running_loop()
    res = result or VoiceResult()
    res.requested = loop.time()
    phrases: asyncio.Queue[_Phrase | None] = asyncio.Queue()
    live = asyncio.Event()  # the gateway still holds the stream: progress reports make sense
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "tokenflow": {"rate": rate, "pacing": pacing}}

    async def receive() -> None:
        builder = PhraseBuilder() if pacing != "phrase" else None
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            res.stream_id = resp.headers.get("X-TokenFlow-Stream-Id")
            live.set()
            count = prev = 0  # tokens through the last event, and through the last phrase
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("id: "):
                    count = int(line.rsplit(":", 1)[1])
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"].get("message", "stream error"))
                choice = (obj.get("choices") or [None])[0]
                if choice is None:
                    continue
                text = (choice.get("delta") or {}).get("content") or ""
                if text and builder is None:  # phrase pacing: every event is a whole phrase
                    phrases.put_nowait(_Phrase(text, prev, count, loop.time()))
                    prev = count
                elif text and builder is not None:
                    for p in builder.add(text, count):
                        phrases.put_nowait(_Phrase(p.text, p.start, p.end, loop.time()))
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            live.clear()  # the gateway forgets the stream after its last event
            if builder is not None and (last := builder.finish()) is not None:
                phrases.put_nowait(_Phrase(last.text, last.start, last.end, loop.time()))

    async def synthesize() -> None:
        while (p := await phrases.get()) is not None:
            # Due to play when the phrases before it have played (now, for the first).
            clip = await tts.synthesize(p.text, deadline=max(loop.time(), res.clock.end if res.clock.phrases else 0.0))
            res.clips.append(clip)
            res.clock.add(p.text, p.start, p.end, p.received, loop.time(), clip.duration)
        res.clock.finish(loop.time())  # a short answer: play what there is

    async def report() -> None:
        await live.wait()
        sent = res.clock.phrases[0].start_token if res.clock.phrases else 0
        while live.is_set():
            await asyncio.sleep(REPORT_EVERY_S)
            now = loop.time()
            heard = res.clock.heard(now + lead_s)
            if heard <= sent or not live.is_set():
                continue
            try:
                async with session.post(f"{url}/v1/streams/{res.stream_id}/progress",
                                        json={"consumed_tokens": heard}) as r:
                    if r.status == 404:  # it ended in the meantime
                        break
                    state: dict[str, Any] = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"progress report refused: {state}")
            except aiohttp.ClientError:
                continue  # the next report says as much
            sent = heard
            res.reports += 1
            res.rate_measured, res.rate_effective = state.get("rate_measured"), state.get("rate")
            res.rate_measured_at = now
            res.progress.append((now, heard, res.rate_measured))

    synth = asyncio.ensure_future(synthesize())
    reporter = asyncio.ensure_future(report())
    try:
        await receive()
        phrases.put_nowait(None)
        await synth
    except Exception as e:  # noqa: BLE001 - a failed answer is a result too (the benchmark counts them)
        res.error = f"{type(e).__name__}: {e}"
    finally:
        live.clear()
        synth.cancel()
        reporter.cancel()
        outcomes = await asyncio.gather(synth, reporter, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    if failed and res.error is None:
        res.error = f"{type(failed[0]).__name__}: {failed[0]}"
    if wait_playback and res.clock.phrases:
        await asyncio.sleep(max(0.0, res.clock.end - loop.time()))
    return res

