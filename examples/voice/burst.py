"""Voice streams in the middle of a burst of text readers, under each policy: does the speech ever stop?

Per policy, a fresh gateway (``tokenflow serve`` with its embedded simulated engine, sim-small) gets, all at
the same instant and interleaved, ``--voices`` voice pipelines (:func:`.pipeline.speak`: phrase pacing, the
``listening`` class, espeak-ng speech, progress reports) and ``--readers`` simulated text readers
(:func:`bench.http.stream_client`, 15-20 tok/s). Printed per policy:

* **underruns**: phrases (each stream's first excepted) whose audio was not ready when the phrase before it
  ended, by more than 100 ms; and the longest such silence. Each is put down to late text (it arrived less than
  the pipeline's reporting lead before its audio was needed: the gateway or the engine) or to late synthesis (the
  text was in hand, the machine did not synthesize it in time);
* **first sound**: from the request to the first audio (the wait for the engine included);
* **measured rate**: the gateway's measured rate for each voice stream (from its answer to the stream's last
  progress report) against that stream's real speech rate over the same window (tokens heard per second of
  audio in the last 6 s before that report: the words differ in length, so the rate moves along the answer):
  streams within 20 %;
* the text readers' TTFT, for the other side of the trade.

    python -m examples.voice.burst --voices 50 --readers 100 --policies tokenflow,fcfs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from typing import Any

import aiohttp

from bench.http import fetch_policy_preempts, spawn_gateway, stream_client
from bench.metrics import RequestRecord, percentile
from bench.workload import WorkloadConfig, generate

from .pipeline import LEAD_S, VoiceResult, speak
from .tts import Espeak

UNDERRUN_S = 0.1  # a silence between two phrases longer than this is an underrun
RATE_MATCH = 0.2  # the measured rate is right within this fraction of the speech rate
RATE_WINDOW_S = 6.0  # the gateway's estimate spans the last drain.window_s (default 6 s) of reports


def rate_ratio(v: VoiceResult) -> float:
    """The gateway's measured rate over the stream's real speech rate in the same window (nan: no measurement)."""
    if not v.rate_measured or not v.clock.phrases:
        return math.nan
    t1 = v.rate_measured_at
    t0 = max(v.clock.phrases[0].start, t1 - RATE_WINDOW_S)
    return v.rate_measured / v.clock.speech_rate_between(t0, t1)


async def run_burst(url: str, voices: int, readers: int, *, voice_tokens: int = 40, reader_tokens: int = 300,
                    wpm: int = 320, seed: int = 1) -> tuple[list[VoiceResult], list[RequestRecord]]:
    """Start every voice and reader against ``url`` at once; return when all have ended."""
    specs = generate(WorkloadConfig(kind="burst", n=max(1, readers), input_mean=256, output_mean=reader_tokens,
                                    rates=((15.0, 0.4), (20.0, 0.6)), seed=seed))[:readers]
    tts = Espeak(wpm)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as session:
        async with session.get(url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        # Arrival order interleaves voices and readers (seeded), so neither kind gets the engine first.
        kinds = ["voice"] * voices + ["reader"] * readers
        random.Random(seed).shuffle(kinds)
        await asyncio.sleep(max(0.0, t0 - loop.time()))  # everything below starts at t0
        vres: list[VoiceResult] = []
        recs: list[RequestRecord] = []
        jobs = []
        reader_specs = iter(specs)
        for kind in kinds:
            if kind == "voice":
                vres.append(VoiceResult())
                jobs.append(speak(session, url, "Read me the news.", model=model, tts=tts, max_tokens=voice_tokens,
                                  result=vres[-1]))
            else:
                spec = next(reader_specs)
                recs.append(RequestRecord(spec.id, 0.0, spec.rate, spec.prompt_tokens, spec.output_tokens))
                jobs.append(stream_client(session, url, model, spec, t0, rec=recs[-1]))
        await asyncio.gather(*jobs)
    return vres, recs


def underrun_causes(v: VoiceResult) -> tuple[int, int]:
    """(text late, synthesis late): an underrun whose text arrived less than the pipeline's lead before its audio
    was needed is the gateway's (or the engine's); one whose text was in hand that early, the synthesizer's."""
    text = synth = 0
    for prev, p in zip(v.clock.phrases, v.clock.phrases[1:]):
        if p.gap > UNDERRUN_S:
            if p.received > prev.end - LEAD_S:
                text += 1
            else:
                synth += 1
    return text, synth


def summarize(vres: list[VoiceResult], recs: list[RequestRecord]) -> dict[str, Any]:
    gaps = [g for v in vres for g in v.clock.gaps()]
    under = [g for g in gaps if g > UNDERRUN_S]
    causes = [underrun_causes(v) for v in vres]
    ratios = [rate_ratio(v) for v in vres]
    first = [v.first_audio_s for v in vres if v.clock.phrases]
    ttft = [r.token_times[0] - r.arrival for r in recs if r.token_times]
    return {
        "voices": len(vres),
        "voice_errors": sum(v.error is not None for v in vres),
        "voices_complete": sum(v.finish_reason is not None and v.error is None for v in vres),
        "phrases": len(gaps),
        "underruns": len(under),
        "underrun_share": len(under) / len(gaps) if gaps else math.nan,
        "underruns_text_late": sum(c[0] for c in causes),
        "underruns_synthesis_late": sum(c[1] for c in causes),
        "longest_silence_s": max(gaps, default=0.0),
        "first_sound_p50_s": percentile(first, 50),
        "first_sound_p99_s": percentile(first, 99),
        "speech_rate_mean": sum(v.clock.speech_rate() for v in vres) / len(vres) if vres else math.nan,
        "rate_within_20pct": sum(abs(r - 1) <= RATE_MATCH for r in ratios if not math.isnan(r)),
        "rate_unmeasured": sum(math.isnan(r) for r in ratios),
        "rate_ratio_min": min((r for r in ratios if not math.isnan(r)), default=math.nan),
        "rate_ratio_max": max((r for r in ratios if not math.isnan(r)), default=math.nan),
        "reports": sum(v.reports for v in vres),
        "readers": len(recs),
        "reader_errors": sum(r.error is not None for r in recs),
        "reader_ttft_p50_s": percentile(ttft, 50),
        "reader_ttft_p99_s": percentile(ttft, 99),
    }


def run_policy(policy: str, voices: int, readers: int, *, tick_s: float = 0.25, **kw: Any) -> dict[str, Any]:
    with spawn_gateway(policy, profile="sim-small", tick_s=tick_s) as url:
        vres, recs = asyncio.run(run_burst(url, voices, readers, **kw))
        preemptions = asyncio.run(fetch_policy_preempts(url))
    return {"policy": policy, **summarize(vres, recs), "preemptions": preemptions}


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("policy", "policy", "{}"), ("underruns >100ms", "underruns", "{}"), ("of phrases", "phrases", "{}"),
            ("text late / synthesis late", None, ""),
            ("share", "underrun_share", "{:.2%}"), ("longest silence s", "longest_silence_s", "{:.2f}"),
            ("first sound p50 s", "first_sound_p50_s", "{:.2f}"), ("first sound p99 s", "first_sound_p99_s", "{:.2f}"),
            ("rate within 20%", "rate_within_20pct", "{}"), ("measured/speech", None, ""),
            ("reader TTFT p99 s", "reader_ttft_p99_s", "{:.2f}"), ("preemptions", "preemptions", "{}"),
            ("errors", None, "")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for name, key, fmt in cols:
            if name == "text late / synthesis late":
                cells.append(f"{r['underruns_text_late']} / {r['underruns_synthesis_late']}")
            elif name == "measured/speech":
                cells.append(f"{r['rate_ratio_min']:.2f}-{r['rate_ratio_max']:.2f}")
            elif name == "errors":
                cells.append(f"{r['voice_errors']} / {r['reader_errors']}")
            elif name == "rate within 20%":
                cells.append(f"{r[key]} of {r['voices']}")
            else:
                cells.append(fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.voice.burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voices", type=int, default=50)
    p.add_argument("--readers", type=int, default=100)
    p.add_argument("--voice-tokens", type=int, default=40)
    p.add_argument("--reader-tokens", type=int, default=300)
    p.add_argument("--wpm", type=int, default=320, help="espeak-ng speed (the simulator's words, 'tok12', are long)")
    p.add_argument("--policies", default="tokenflow,fcfs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    rows = []
    for policy in args.policies.split(","):
        rows.append(run_policy(policy, args.voices, args.readers, voice_tokens=args.voice_tokens,
                               reader_tokens=args.reader_tokens, wpm=args.wpm, seed=args.seed))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
