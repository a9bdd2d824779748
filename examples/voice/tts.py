"""Speech synthesis with espeak-ng (the Debian package): a phrase of text in, 16-bit mono PCM and its duration out.

One ``espeak-ng --stdout`` process per phrase; its WAV is parsed here (written to a pipe, its header cannot give
the data length, so the data runs to the end). A product would put its own TTS engine behind the same call.

Syntheses share the machine: at most ``concurrency`` run at once (one per core by default), and the phrase that
must play soonest goes first. Fifty streams starting together then queue in deadline order instead of a hundred
processes fighting for two cores and every first word coming late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clip:
    pcm: bytes  # little-endian signed 16-bit samples
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return len(self.pcm) / (2 * self.channels * self.sample_rate)


class SynthesisError(RuntimeError):
    pass


def parse_wav(data: bytes) -> Clip:
    """PCM and format of a RIFF/WAVE file; the ``data`` chunk may claim any length (it runs to the end)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthesisError("not a WAV file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag != 1 or bits != 16:
                raise SynthesisError(f"expected 16-bit PCM, got format {tag} with {bits} bits")
            fmt = (rate, channels)
        elif cid == b"data":
            if fmt is None:
                raise SynthesisError("WAV data before its format")
            pcm = data[body:body + size] if body + size <= len(data) else data[body:]
            pcm = pcm[: len(pcm) - len(pcm) % (2 * fmt[1])]
            return Clip(pcm, fmt[0], fmt[1])
        pos = body + size + (size & 1)
    raise SynthesisError("WAV without data")


class DeadlineSlots:
    """At most ``n`` holders at once; among those waiting, the earliest deadline goes first."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @asynccontextmanager
    async def take(self, deadline: float) -> AsyncIterator[None]:
        if self.free > 0 and not self._waiting:
            self.free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (deadline, next(self._seq), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # the slot was handed over just as we were cancelled
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():  # hand the slot to the most urgent live waiter
                fut.set_result(None)
                return
        self.free += 1


class Espeak:
    """``espeak-ng`` at ``wpm`` words per minute (its default is 175) with ``voice``."""

    def __init__(self, wpm: int = 175, voice: str = "en", binary: str = "espeak-ng", concurrency: int | None = None
                 ) -> None:
        self.args = [binary, "--stdout", "-s", str(wpm), "-v", voice]
        self.slots = DeadlineSlots(concurrency or os.cpu_count() or 1)

    async def synthesize(self, text: str, deadline: float = 0.0) -> Clip:
        """Audio for ``text``; ``deadline`` (loop time) orders it among waiting syntheses."""
        async with self.slots.take(deadline):
            proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(text.encode())  # text on stdin: never parsed as options
        if proc.returncode != 0:
            raise SynthesisError(f"espeak-ng exited with {proc.returncode}: {err.decode(errors='replace')[:200]}")
        return parse_wav(out)


def wav_bytes(pcm: bytes, sample_rate: int, channels: int = 1) -> bytes:
    """A complete WAV file (correct lengths) around ``pcm``."""
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, channels,
                         sample_rate, sample_rate * channels * 2, channels * 2, 16, b"data", len(pcm))
    return header + pcm
