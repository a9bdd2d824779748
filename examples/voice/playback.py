"""The playback clock: when each phrase's audio plays, from the audio's real duration, and what has been heard.

Pure: the caller passes the times. Playback starts once ``start_buffer_s`` of audio is ready (or the answer has
ended), as audio players buffer before they start: a first word alone would leave the next phrase no time. Then a
phrase starts when the one before it ends, or when its audio is ready if that is later: the difference is an
underrun (silence in the middle of the answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Played:
    text: str
    start_token: int  # tokens of the answer before this phrase
    end_token: int  # tokens through its last one
    received: float  # when its text arrived
    ready: float  # when its audio was synthesized
    start: float  # when it starts playing
    duration: float  # seconds of audio
    gap: float  # silence before it, after the phrase before it (0 for the first)

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(slots=True)
class PlaybackClock:
    start_buffer_s: float = 0.0
    phrases: list[Played] = field(default_factory=list)  # scheduled to play
    _before_start: list[tuple[str, int, int, float, float, float]] = field(default_factory=list)

    def add(self, text: str, start_token: int, end_token: int, received: float, ready: float, duration: float) -> None:
        """A phrase's audio is ready at ``ready``."""
        if self.phrases:
            prev = self.phrases[-1].end
            self.phrases.append(Played(text, start_token, end_token, received, ready, max(ready, prev), duration,
                                       max(0.0, ready - prev)))
            return
        self._before_start.append((text, start_token, end_token, received, ready, duration))
        if sum(b[5] for b in self._before_start) >= self.start_buffer_s:
            self.finish(ready)

    def finish(self, now: float) -> None:
        """Start playing what is buffered, if playback has not started (the answer ended at ``now``)."""
        t = now
        for text, start_token, end_token, received, ready, duration in self._before_start:
            self.phrases.append(Played(text, start_token, end_token, received, ready, t, duration, 0.0))
            t += duration
        self._before_start.clear()

    def heard(self, t: float) -> int:
        """Tokens heard by ``t``: every phrase that ended, and the share of the playing one that has played
        (its tokens taken as evenly spread over its audio)."""
        n = self.phrases[0].start_token if self.phrases else 0
        for p in self.phrases:
            if t >= p.end:
                n = p.end_token
            elif t > p.start:
                return p.start_token + math.floor((p.end_token - p.start_token) * (t - p.start) / p.duration)
            else:
                break
        return n

    @property
    def end(self) -> float:
        return self.phrases[-1].end if self.phrases else math.nan

    @property
    def audio_s(self) -> float:
        return sum(p.duration for p in self.phrases)

    @property
    def tokens(self) -> int:
        return self.phrases[-1].end_token - self.phrases[0].start_token if self.phrases else 0

    def speech_rate(self) -> float:
        """Tokens per second of audio: the rate at which this listener really consumes the answer."""
        audio = self.audio_s
        return self.tokens / audio if audio > 0 else math.nan

    def speech_rate_between(self, t0: float, t1: float) -> float:
        """Tokens heard per second of audio played between ``t0`` and ``t1``: silences (underruns) left out, as
        a measurement that counts only the time the listener was busy must leave them out."""
        playing = sum(max(0.0, min(t1, p.end) - max(t0, p.start)) for p in self.phrases)
        return (self.heard(t1) - self.heard(t0)) / playing if playing > 0 else math.nan

    def gaps(self) -> list[float]:
        """The silence before every phrase but the first."""
        return [p.gap for p in self.phrases[1:]]
