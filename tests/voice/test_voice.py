"""The voice example end to end: real espeak-ng speech, its durations checked with sox, against a gateway with
its simulated engine; then voice streams in the middle of a burst of text readers under tokenflow and fcfs."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from examples.voice.burst import RATE_MATCH, UNDERRUN_S, rate_ratio, run_policy
from examples.voice.pipeline import speak
from examples.voice.tts import Espeak, wav_bytes

from .conftest import FIGURES

ROOT = Path(__file__).resolve().parents[2]


def sox_seconds(path: Path) -> float:
    return float(subprocess.run(["sox", "--i", "-D", str(path)], check=True, capture_output=True, text=True).stdout)


async def test_speech_durations_are_the_audios_own(tmp_path):
    tts = Espeak(wpm=320)
    short, long = await asyncio.gather(tts.synthesize(" tok1 tok2"), tts.synthesize(" tok1 tok2 tok3 tok4 tok5 tok6"))
    assert long.duration > 2 * short.duration > 0.3  # real speech: more words, more audio
    for clip in (short, long):
        path = tmp_path / "clip.wav"
        path.write_bytes(wav_bytes(clip.pcm, clip.sample_rate))
        assert math.isclose(sox_seconds(path), clip.duration, abs_tol=2e-6)  # sox reads the same duration


async def test_an_answer_is_spoken_phrase_by_phrase_without_silences(gateway, model):
    async with aiohttp.ClientSession() as session:
        res = await speak(session, gateway.url, "Read me something", model=model, tts=Espeak(wpm=320), max_tokens=30)
    assert res.error is None and res.finish_reason == "length"
    played = res.clock.phrases
    assert "".join(p.text for p in played) == "".join(f" tok{i}" for i in range(30))
    assert all(re.fullmatch(r"( tok\d+)+", p.text) for p in played)  # whole words, always
    assert [p.start_token for p in played[1:]] == [p.end_token for p in played[:-1]]
    assert max(res.clock.gaps()) <= UNDERRUN_S
    assert res.first_audio_s < 1.5
    # The gateway learnt the speech rate from the progress reports, not from the socket (read at once).
    assert res.reports >= 10 and res.rate_measured is not None
    assert abs(rate_ratio(res) - 1) <= RATE_MATCH, (res.rate_measured, res.clock.speech_rate())
    FIGURES["one stream: speech rate, gateway's measured rate (tok/s)"] = (
        f"{res.clock.speech_rate():.2f}, {res.rate_measured:.2f}")


async def test_the_command_writes_what_the_listener_heard(gateway, model, tmp_path):
    out = tmp_path / "answer.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.voice", "Hello", "--url", gateway.url, "--max-tokens", "12", "--wpm", "320",
        "--out", str(out), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    m = re.search(r"12 tokens in ([0-9.]+) s of speech", text)
    assert m, text
    assert "tok0" in text and "tok11" in text and f"wrote {out}" in text
    # The file holds every phrase's audio and every silence between them: about the speech's length.
    assert math.isclose(sox_seconds(out), float(m.group(1)), abs_tol=0.15)


def test_voice_streams_in_a_burst_of_readers_under_tokenflow_and_fcfs():
    """20 voice streams among 40 text readers: more streams than the engine's 32 slots, so tokenflow pauses and
    resumes the voices; 100 phrases, so 1 % is one (CI-sized: `python -m examples.voice.burst` runs 50 voices
    among 100 readers, docs/benchmarks.md)."""
    rows = {policy: run_policy(policy, 20, 40, voice_tokens=40, reader_tokens=300, wpm=320)
            for policy in ("tokenflow", "fcfs")}
    for policy, r in rows.items():
        FIGURES[f"burst, {policy}: underruns > 100 ms"] = (
            f"{r['underruns']} of {r['phrases']} phrases ({r['underruns_text_late']} text late, "
            f"{r['underruns_synthesis_late']} synthesis late; longest silence {r['longest_silence_s']:.2f} s), "
            "first sound "
            f"p50 {r['first_sound_p50_s']:.2f} s p99 {r['first_sound_p99_s']:.2f} s, rate within 20 %: "
            f"{r['rate_within_20pct']} of {r['voices']} (measured / speech {r['rate_ratio_min']:.2f}-"
            f"{r['rate_ratio_max']:.2f}), readers' TTFT p99 {r['reader_ttft_p99_s']:.2f} s, "
            f"preemptions {r['preemptions']}")
        assert r["voice_errors"] == r["reader_errors"] == 0 and r["voices_complete"] == 20
        assert r["rate_within_20pct"] == 20  # every voice stream: the gateway knows how fast it is spoken
    tf = rows["tokenflow"]
    assert tf["preemptions"] > 0  # streams were paused and resumed: the voices' buffers were put to use
    assert tf["underrun_share"] <= 0.01, tf
