"""``python -m examples.voice``: ask a TokenFlow gateway a question and speak the answer as it streams.

Writes what a listener would hear (silences included) to ``--out`` and prints each phrase as it is played.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp

from .pipeline import speak
from .tts import Espeak, wav_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.voice", description=__doc__)
    p.add_argument("prompt", nargs="?", default="Tell me a story.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    p.add_argument("--model", help="model name (default: the gateway's first)")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--rate", default="listening", help="declared rate: tokens/s or a class (default: %(default)s)")
    p.add_argument("--pacing", default="phrase", choices=("phrase", "smooth", "none"))
    p.add_argument("--wpm", type=int, default=175, help="espeak-ng speed in words per minute (default: %(default)s)")
    p.add_argument("--voice", default="en", help="espeak-ng voice (default: %(default)s)")
    p.add_argument("--out", default="answer.wav", help="WAV file of what was heard (default: %(default)s)")
    args = p.parse_args(argv)
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    async with aiohttp.ClientSession() as session:
        model = args.model
        if model is None:
            async with session.get(args.url + "/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
        res = await speak(session, args.url, args.prompt, model=model, tts=Espeak(args.wpm, args.voice),
                          rate=args.rate, pacing=args.pacing, max_tokens=args.max_tokens, wait_playback=True)
    if res.error:
        print(f"error: {res.error}", file=sys.stderr)
        return 1
    clock = res.clock
    for p in clock.phrases:
        gap = f"  (silence {p.gap:.2f} s before it)" if p.gap > 0.1 and p is not clock.phrases[0] else ""
        print(f"{p.start - res.requested:6.2f} s  tokens {p.start_token:3d}-{p.end_token:3d}  {p.duration:4.2f} s  "
              f"{p.text.strip()}{gap}")
    rate = res.rate_measured
    print(f"first sound after {res.first_audio_s:.2f} s; {clock.tokens} tokens in {clock.audio_s:.1f} s of speech "
          f"({clock.speech_rate():.2f} tok/s); the gateway measured "
          f"{'nothing yet' if rate is None else f'{rate:.2f} tok/s'} from {res.reports} progress reports")
    if clock.phrases and res.clips:
        sr = res.clips[0].sample_rate
        pcm = bytearray()
        for p, clip in zip(clock.phrases, res.clips):  # silence for every gap: what the listener heard
            pcm += b"\0\0" * round(p.gap * sr if p is not clock.phrases[0] else 0) + clip.pcm
        with open(args.out, "wb") as f:  # noqa: ASYNC230 - once, at the end: nothing else runs on the loop then
            f.write(wav_bytes(bytes(pcm), sr))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
