"""One streamed answer: the events its engine produced, what was released to the client, and resumption.

The engine reader appends tokens as they come (through the session store, which keeps them resumable); the
pacing clock releases them at the client's rate (``smooth``) or they are released at once (``none``); the
client writer sends what was released. The :class:`~gateway.streams.reader.ReaderModel` gives the exact buffer
either way, and a :class:`~gateway.streams.flow.ReadAhead` keeps a paced stream from reading its engine far
ahead of its reader.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from .base import ENDED, StreamBase, StreamSpec, Upstream
from .flow import ReadAhead
from .reader import ReaderModel
from .tokens import Delta, Final, TokenLog

if TYPE_CHECKING:
    from ..api.sse import ChunkEncoder
    from .pacer import PacingClock

DirectSend = Callable[[bytes, int], bool]  # see gateway/streams/direct.py


class Delivery(Enum):
    """Whether a client connection is attached, and whether it has been handed the end."""

    DETACHED = "detached"  # no client writer (not yet attached, or its connection ended)
    ATTACHED = "attached"  # a client writer sends what is released
    COMPLETE = "complete"  # the attached writer has been handed the last event


_DETACHED, _ATTACHED, _COMPLETE = Delivery.DETACHED, Delivery.ATTACHED, Delivery.COMPLETE


class Superseded(Exception):
    """A newer client connection took this stream over; the older writer must stop."""


class Stream(StreamBase):
    __slots__ = (
        "_clock",
        "_clock_seq",
        "_max_pending",
        "_on_clock",
        "_out",
        "_pending",
        "_wake",
        "attach_seq",
        "base",
        "delivery",
        "deltas",
        "direct",
        "first_sent_time",
        "flow",
        "include_usage",
    )

    def __init__(self, spec: StreamSpec, encoder: ChunkEncoder, *, clock: PacingClock | None,
                 max_pending: int = 65536, read_ahead_s: float = 0.0) -> None:
        """``clock`` paces a smooth stream; ``max_pending`` bounds the events it holds (merged beyond);
        ``read_ahead_s`` is its read-ahead window (0: no bound)."""
        super().__init__(spec, encoder)
        pacing = spec.pacing
        self.include_usage = spec.include_usage
        self.first_sent_time: float | None = None
        # Held for pacing: (tokens once read, event). A token's event is its delta's text until released, and
        # is encoded then: the text is the token log's own object, so a held token costs a deque slot and a
        # tuple instead of its ~300-byte SSE event (a reader who stopped reading holds up to a read-ahead
        # burst of them; docs/operations.md). Tails and merged events are bytes.
        self._pending: deque[tuple[int, str | bytes]] = deque()
        self._out: list[bytes] = []  # released, not yet written
        self._wake = asyncio.Event()
        self._clock = clock if pacing != "none" else None  # smooth or phrase: paced
        self._on_clock = False  # the pacing clock will call release_due (or a release is in progress)
        self._clock_seq = -1  # the pacing clock's live entry for this stream (older entries are stale)
        self._max_pending = max_pending
        # Resumption: every delta so far (bounded by max_tokens; compact, a few bytes per token), the index the
        # attached client resumed from, and the attached writer (``attach_seq`` tells a superseded one it is).
        self.deltas = TokenLog()
        self.base = 0
        self.delivery = _DETACHED
        self.attach_seq = 0
        # The attached writer's synchronous send (see gateway/streams/direct.py): released events go straight to
        # the client's socket from the pacing clock or the engine reader, with no writer task wake-up, while the
        # socket takes them; it returns False (and the writer task sends) otherwise.
        self.direct: DirectSend | None = None
        self.flow = ReadAhead(read_ahead_s, spec.rate) if pacing != "none" and read_ahead_s > 0 else None

    @property
    def attached(self) -> bool:
        return self.delivery is not _DETACHED

    @property
    def complete(self) -> bool:
        """The attached writer has been handed the last event."""
        return self.delivery is _COMPLETE

    def attach(self) -> None:
        """The request's own connection serves it (a reconnecting client goes through :meth:`reattach`)."""
        self.delivery = _ATTACHED

    def detach(self) -> None:
        self.delivery = _DETACHED

    def set_rate(self, rate: float, now: float) -> None:
        """Change the effective rate (from drain evidence); a paced stream is rescheduled at once."""
        self.reader.set_rate(rate, now)
        if self.flow is not None:
            self.flow.set_rate(rate)
        if self._on_clock and self._clock is not None:
            due = self.reader.due_time()  # inf once the reader has read every token: what is held is due now
            self._clock.schedule(self, now if due == math.inf else max(now, due))

    # --- producer side (the session store's deliveries) ---
    def on_tokens(self, text: str, n: int, now: float, ids: list[int] | None = None) -> None:
        """``n`` tokens whose text is ``text`` arrived from the engine."""
        start = self.generated
        self.generated += n
        self.deltas.add(self.generated, text, ids)
        if self.generated <= self.base:
            return  # the attached client already has these (it resumed past them)
        self._emit(text, self.generated, self.generated - max(start, self.base), now)

    def on_deltas(self, deltas: list[Delta], now: float) -> None:
        """Deltas from the session store, ``(tokens after it, text, ids)`` in order; those this stream already
        has are skipped. Several new ones for a paced stream (one engine read's worth) are taken in one step:
        the reader model gets them at once (the same as one by one at the same instant) and the events are
        queued together."""
        gen = self.generated
        if (len(deltas) < 2 or self._clock is None or deltas[0][0] <= gen
                or gen < self.base or len(self._pending) + len(deltas) > self._max_pending):
            for end, text, ids in deltas:
                if end > self.generated:
                    self.on_tokens(text, end - self.generated, now, ids)
            return
        self.deltas.extend(deltas)
        base, queue = self.base, self._pending.append
        end = gen
        for d in deltas:
            end = d[0]
            queue((end - base, d[1]))
        self.generated = end
        self.reader.on_tokens(end - gen, now)
        flow = self.flow
        if flow is not None and not flow.paused:
            flow.on_queued(end - base - self.released_tokens)
        self._kick(now)

    def _emit(self, text: str, index: int, n: int, now: float) -> None:
        """Queue the event for a delta ending at token ``index``, ``n`` of whose tokens are new to the client."""
        self.reader.on_tokens(n, now)
        if self._clock is None:
            self._release(self.encoder.token(text, index), index - self.base)
        else:
            if len(self._pending) >= self._max_pending:
                # Explicit bound: merging keeps the count flat if a client is paced far behind its engine (the
                # merged texts leave as one event).
                prev = self._pending.pop()[1]
                merged = prev + text if isinstance(prev, str) else prev + self.encoder.token(text, index)
                self._pending.append((index - self.base, merged))
            else:
                self._pending.append((index - self.base, text))
            flow = self.flow
            if flow is not None and not flow.paused:
                flow.on_queued(index - self.base - self.released_tokens)
            self._kick(now)

    def on_finished(self, reason: str, prompt_tokens: int, completion_tokens: int | None, now: float) -> None:
        self.upstream = ENDED
        self.finish_reason = reason
        self.prompt_tokens = prompt_tokens
        if completion_tokens is not None and completion_tokens > self.generated:
            # The engine counted tokens that carried no text (held-back bytes): account for them.
            extra = completion_tokens - self.generated
            self.generated = completion_tokens
            self.reader.on_tokens(extra, now)
        self.reader.finished = True
        self._queue_tail(self._tail(), now)

    def on_error(self, message: str, code: str, now: float) -> None:
        self.upstream = ENDED
        self.error = (message, code)
        self.reader.finished = True
        self._queue_tail(self.encoder.error(message, code), now)

    def _tail(self) -> bytes:
        if self.error is not None:
            return self.encoder.error(*self.error)
        tail = self.encoder.finish(self.finish_reason or "stop", self.generated)
        if self.include_usage:
            tail += self.encoder.usage(self.prompt_tokens, self.generated, self.generated)
        return tail

    def _queue_tail(self, tail: bytes, now: float) -> None:
        if self._clock is None:
            self._release(tail, max(0, self.generated - self.base), last=True)
        else:
            self._pending.append((max(0, self.generated - self.base), tail))
            self._kick(now)

    # --- who produces it ---
    def restore(self, deltas: list[Delta], final: Final | None) -> None:
        """Load what another replica produced (no client attached yet): its deltas and, if it ended, how.
        Until it ended, this replica follows that replica's token log."""
        self.deltas = TokenLog(deltas)
        self.generated = self.deltas.tokens
        self.base = self.generated
        if final is None:
            self.upstream = Upstream.REPLICA
            return
        self.upstream = ENDED
        self.finish_reason, self.prompt_tokens, self.error = final.reason, final.prompt_tokens, final.error
        self.reader.finished = True

    def mark_moved(self) -> None:
        """Another replica owns this stream now: end the client's connection so it resumes there. (A stream
        whose end this replica already has keeps serving it.)"""
        if self.upstream is not ENDED:
            self.upstream = Upstream.MOVED
        self._wake.set()

    # --- consumer side: attachment ---
    def reattach(self, after: int, now: float) -> int:
        """A client (re)connects having received the tokens up to ``after``: serve it from there.

        The reader model restarts at ``now`` (the client resumes reading where it stopped), the tokens
        already produced after ``after`` are paced from now on, and the older writer, if any, is superseded.
        Returns the new attachment's sequence number for :meth:`next_output`.
        """
        self.base = after
        self.direct = None  # the older writer's; the new one installs its own
        if self.flow is not None:
            self.flow.resume()  # what was held back is gone from _pending: read on
        self.reader = ReaderModel(self.reader.rate)
        self._pending.clear()
        self._out.clear()
        self.delivery = _ATTACHED
        self.first_sent_time = None
        self.released_tokens = 0
        # Queue the whole replay before anything leaves (a release must see every event behind it to know
        # whether it is the last), then schedule afresh on the new reader's clock (older entries go stale).
        self._on_clock = True
        self.encoder.resumed(after > 0)
        for prev, (end, text, _) in self.deltas.since(after):
            self._emit(text, end, end - max(prev, after), now)
        if self.upstream is ENDED:
            self.reader.finished = True
            self._queue_tail(self._tail(), now)
        self._on_clock = False
        if self._pending:
            self._kick(now)
        self.attach_seq += 1
        self._wake.set()
        return self.attach_seq

    # --- pacing clock side ---
    def _kick(self, now: float) -> None:
        clock = self._clock
        if not self._on_clock and clock is not None:
            r = self.reader
            due = r.next_due if r.consumed < r.produced else now  # nothing left to read: a tail leaves at once
            if due <= now:
                # The reader is waiting for this token (the first one, or the engine is behind): release it now
                # rather than on the clock's next tick, which would be one more event-loop turn away.
                clock.lateness.observe(0.0)
                due = self.release_due(now)
                if due == math.inf:
                    return
            self._on_clock = True
            clock.schedule(self, max(now, due))

    def release_due(self, now: float) -> float:
        """Release every event whose tokens the reader has reached by ``now``; return the next due time."""
        r = self.reader
        r.advance(now)
        consumed = r.consumed
        pending = self._pending
        if pending and pending[0][0] <= consumed:
            entry = pending.popleft()
            end = entry[0]
            ev = self._encoded(entry)
            if pending and pending[0][0] <= consumed:  # several due: one write for all of them
                parts = [ev]
                while pending and pending[0][0] <= consumed:
                    entry = pending.popleft()
                    end = entry[0]
                    parts.append(self._encoded(entry))
                ev = b"".join(parts)
            direct = self.direct
            if direct is not None and pending and not self._out and direct(ev, end):  # the usual case, inlined
                self.released_tokens = end
            else:
                self._release(ev, end, last=not pending and self.upstream is ENDED)
            flow = self.flow
            if flow is not None and flow.paused:
                flow.on_released(r.produced - end)
        if not pending:
            self._on_clock = False
            return math.inf
        # Events still pending lie beyond ``consumed``, so the reader has a token to come: due at next_due.
        return r.next_due

    def _encoded(self, entry: tuple[int, str | bytes]) -> bytes:
        """A held event's bytes (a token's text is encoded with its absolute index)."""
        end, ev = entry
        return self.encoder.token(ev, end + self.base) if isinstance(ev, str) else ev

    def _release(self, event: bytes, tokens: int, last: bool = False) -> None:
        direct = self.direct
        if direct is not None and not last and not self._out and direct(event, tokens):
            self.released_tokens = tokens
            return
        self._out.append(event)
        self.released_tokens = tokens
        if last and self.delivery is _ATTACHED:
            self.delivery = _COMPLETE
        self._wake.set()

    # --- consumer side: the client writer ---
    async def next_output(self, seq: int | None = None) -> bytes:
        """Wait until something is released; return it (possibly several events joined).

        With ``seq`` (from :meth:`reattach`), raise :class:`Superseded` once a newer connection attached, and
        return ``b""`` when the stream moved to another replica.
        """
        while not self._out:
            if seq is not None and seq != self.attach_seq:
                raise Superseded(self.id)
            if self.upstream is Upstream.MOVED:
                return b""
            self._wake.clear()
            await self._wake.wait()
        if seq is not None and seq != self.attach_seq:
            raise Superseded(self.id)
        out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        return out

    @property
    def held_events(self) -> int:
        return len(self._pending)
