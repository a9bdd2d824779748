"""``pacing: "phrase"``: a stream for speech, released in whole phrases at the listener's rate.

A text-to-speech front end must not receive half a word, and should not have to wait for the rest of a
phrase before it can speak: with ``smooth`` pacing the words of a phrase would trickle in at the very rate it
is spoken. Here the engine's deltas are grouped into phrases (:mod:`.phrasing`: clause or sentence ends,
whole words at most), each sent as **one event** holding the phrase's text, with ``id: <stream>:<tokens through
it>``. A complete phrase leaves when the listener (the reader model, at the stream's effective rate) starts the
phrase before it: the synthesizer holds the next phrase while it speaks one, so its latency never shows as
silence, and holds nothing more. A phrase the engine has not finished when the listener reaches it (an engine
slower than its listener, or paused) leaves word by word as the words complete; a word is never cut.

The reader model, buffers, drain measurement and progress reports are the same as for ``smooth`` pacing.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

from .base import ENDED, StreamSpec
from .phrasing import Phrase, PhraseBuilder
from .stream import Stream
from .tokens import Delta

if TYPE_CHECKING:
    from ..api.sse import ChunkEncoder
    from .pacer import PacingClock

# Phrase limits (see phrasing.PhraseBuilder): about 2 to 4 s of speech.
MAX_WORDS = 8
MAX_TOKENS = 24


class PhraseStream(Stream):
    __slots__ = ("_due_at", "_last_start", "_phrases")

    def __init__(self, spec: StreamSpec, encoder: ChunkEncoder, *, clock: PacingClock | None,
                 max_pending: int = 65536, read_ahead_s: float = 0.0) -> None:
        super().__init__(spec, encoder, clock=clock, max_pending=max_pending, read_ahead_s=read_ahead_s)
        self._phrases = PhraseBuilder(MAX_WORDS, MAX_TOKENS)
        self._last_start: int | None = None  # first token of the phrase queued last (relative to ``base``)
        self._due_at = math.inf  # when the pacing clock will call next (while scheduled)
        # Held events are (release index, index through it, event), relative to ``base``: a phrase is released
        # once the listener reaches the first token of the phrase before it, and counts as sent through its last.
        self._pending: deque[tuple[int, int, bytes]] = deque()  # type: ignore[assignment]

    def buffer_tokens(self, now: float) -> float:
        """What the listener has in whole phrases. The phrase still open needs more tokens from the engine before
        it can leave whole (its last word, at least, may go on), so it does not count: the policy then resumes a
        paused stream in time to finish it. (Counted, it starved listeners by up to a phrase in tests.)"""
        return max(0.0, super().buffer_tokens(now) - self._phrases.held_tokens)

    def set_rate(self, rate: float, now: float) -> None:
        self.reader.set_rate(rate, now)
        if self.flow is not None:
            self.flow.set_rate(rate)
        if self._on_clock:  # due times move with the rate: set the clock afresh
            self._on_clock = False
            self._kick(now)

    # --- producer side ---
    def on_deltas(self, deltas: list[Delta], now: float) -> None:
        for end, text, ids in deltas:  # phrases are built one delta at a time
            if end > self.generated:
                self.on_tokens(text, end - self.generated, now, ids)

    def _emit(self, text: str, index: int, n: int, now: float) -> None:
        self.reader.on_tokens(n, now)
        done = self._phrases.add(text, index)
        for phrase in done:
            self._queue(phrase)
        self._kick(now)
        flow = self.flow
        if done and self._pending and flow is not None and not flow.paused:
            # Complete phrases waiting beyond the read-ahead bound stop the engine reads. An open phrase never
            # does: it needs the next token to end.
            flow.on_queued(self._pending[-1][1] - self.released_tokens)

    def _queue(self, p: Phrase) -> None:
        start = max(0, p.start - self.base)
        key = 1 + (start if self._last_start is None else self._last_start)  # one phrase ahead of the listener
        self._last_start = start
        self._pending.append((key, p.end - self.base, self.encoder.token(p.text, p.end)))

    def _queue_tail(self, tail: bytes, now: float) -> None:
        last = self._phrases.finish()
        if last is not None:
            self._queue(last)
        end = max(0, self.generated - self.base)
        self._pending.append((end, end, tail))
        self._kick(now)

    def reattach(self, after: int, now: float) -> int:
        self._phrases = PhraseBuilder(MAX_WORDS, MAX_TOKENS, start=after)
        self._last_start = None
        seq = super().reattach(after, now)
        self._kick(now)  # an open phrase may be due already
        return seq

    # --- pacing clock side ---
    def _due(self, key: int) -> float:
        """When the listener reaches token ``key`` (relative, 1-based); every token up to it has arrived."""
        r = self.reader
        return r.next_due + (key - r.consumed - 1) / r.rate if key > r.consumed else -math.inf

    def _next_due(self) -> float:
        if self._pending:
            return self._due(self._pending[0][0])
        if self._phrases.held_tokens:  # an open phrase: due when the listener reaches it
            return self._due(self._phrases.start - self.base + 1)
        return math.inf

    def _kick(self, now: float) -> None:
        """New phrases or tokens: release what is due now, and make sure the clock calls at the next due time
        (a phrase queued one ahead can be due before the open phrase the clock was set for)."""
        clock = self._clock
        if clock is None:
            return
        self.reader.advance(now)
        due = self._next_due()
        if self._on_clock and due >= self._due_at:
            return
        if due <= now:
            clock.lateness.observe(0.0)
            due = self.release_due(now)
        if due < math.inf:
            self._on_clock = True
            self._due_at = due = max(now, due)
            clock.schedule(self, due)

    def release_due(self, now: float) -> float:
        r = self.reader
        r.advance(now)
        consumed = r.consumed
        pending = self._pending
        if not pending and self._phrases.held_tokens and self._phrases.start - self.base + 1 <= consumed:
            # The listener reached a phrase the engine has not finished: its whole words go now.
            words = self._phrases.flush_words()
            if words is not None:
                self._queue(words)
        if pending and pending[0][0] <= consumed:
            parts = []
            end = 0
            while pending and pending[0][0] <= consumed:
                _, end, ev = pending.popleft()
                parts.append(ev)
            self._release(b"".join(parts), end, last=not pending and self.upstream is ENDED)
            flow = self.flow
            if flow is not None and flow.paused:
                flow.on_released(pending[-1][1] - end if pending else 0)
        due = self._next_due()
        if due <= now:  # only an open phrase whose first word is not whole yet: its next delta kicks it
            due = math.inf
        if due == math.inf:
            self._on_clock = False
        self._due_at = due
        return due


def stream_class(pacing: str) -> type[Stream]:
    """The Stream class for a pacing mode."""
    return PhraseStream if pacing == "phrase" else Stream
