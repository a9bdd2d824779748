"""One client stream: the tokens its engine produced, what was sent, and its reader model.

The upstream reader appends tokens as they come; the pacing clock releases them at the client's rate
(``smooth``) or they are released at once (``none``); the client writer sends what was released. The
:class:`~gateway.streams.reader.ReaderModel` gives the exact buffer either way.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from ..api.sse import ChunkEncoder
from .reader import ReaderModel

if TYPE_CHECKING:
    from .drain import DrainTracker
    from .pacer import PacingClock

Pacing = Literal["smooth", "phrase", "none"]  # "phrase": gateway/streams/phrase_stream.py
# One engine delta: (token index after it, its text, its token ids when the engine gave them).
Delta = tuple[int, str, "list[int] | None"]


class Superseded(Exception):
    """A newer client connection took this stream over; the older writer must stop."""


class Stream:
    __slots__ = (
        "id",
        "engine",
        "model",
        "kind",
        "pacing",
        "rate_declared",
        "arrival_time",
        "max_tokens",
        "reader",
        "encoder",
        "generated",
        "prompt_tokens",
        "finish_reason",
        "error",
        "upstream_done",
        "client_done",
        "first_sent_time",
        "include_usage",
        "engine_status",
        "kv_device_tokens",
        "kv_host_tokens",
        "priority",
        "preemptions",
        "_pending",
        "_out",
        "_wake",
        "_clock",
        "_scheduled",
        "_max_pending",
        "collected",
        "deltas",
        "base",
        "attached",
        "attach_seq",
        "owned",
        "lost",
        "created",
        "drain",
        "declared_rate",
        "released_tokens",
        "_clock_seq",
        "direct",
        "upstream_pause",
        "_upstream_paused",
        "_read_ahead_s",
    )

    def __init__(
        self,
        id: str,
        engine: str,
        model: str,
        kind: str,
        rate: float,
        pacing: Pacing,
        arrival_time: float,
        max_tokens: int | None,
        encoder: ChunkEncoder,
        clock: "PacingClock | None",
        *,
        rate_declared: bool = True,
        include_usage: bool = False,
        max_pending: int = 65536,
        collect: bool = False,
        read_ahead_s: float = 0.0,
    ) -> None:
        self.id = id
        self.engine = engine
        self.model = model
        self.kind = kind
        self.pacing: Pacing = pacing
        self.rate_declared = rate_declared
        self.arrival_time = arrival_time
        self.max_tokens = max_tokens
        self.reader = ReaderModel(rate)
        self.encoder = encoder
        self.generated = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.error: tuple[str, str] | None = None  # (message, code)
        self.upstream_done = False
        self.client_done = False  # the last event was released to the writer
        self.first_sent_time: float | None = None
        self.include_usage = include_usage
        # Last engine view (from the control loop), for listings and metrics.
        self.engine_status = "waiting"
        self.kv_device_tokens = 0
        self.kv_host_tokens = 0
        self.priority = 0
        self.preemptions = 0
        self._pending: deque[tuple[int, bytes]] = deque()  # (tokens once read, event) held for pacing
        self._out: list[bytes] = []  # released, not yet written
        self._wake = asyncio.Event()
        self._clock = clock if pacing != "none" else None
        self._scheduled = False
        self._max_pending = max_pending
        self.collected: list[str] | None = [] if collect else None  # non-streaming: gather text, send nothing
        # Resumption: every delta so far (bounded by max_tokens), the index the attached client resumed
        # from, whether a client writer is attached (and which one), whether this replica reads the engine.
        self.deltas: list[Delta] = []
        self.base = 0
        self.attached = False
        self.attach_seq = 0
        self.owned = True
        self.lost = False  # ownership moved to another replica: the writer closes so the client reconnects
        self.created = encoder.created
        # Measured drain (gateway.streams.drain): the connection's evidence, when a writer tracks it.
        self.drain: DrainTracker | None = None
        self.declared_rate = rate  # as requested (or the default class); the effective rate may move off it
        self.released_tokens = 0  # reader-relative token index through which events were released
        self._clock_seq = -1  # the pacing clock's live entry for this stream (older entries are stale)
        # The attached writer's synchronous send (see gateway/streams/direct.py): released events go straight to
        # the client's socket from the pacing clock or the engine reader, with no writer task wake-up, while the
        # socket takes them; it returns False (and the writer task sends) otherwise.
        self.direct: Callable[[bytes, int], bool] | None = None
        # Read-ahead bound (paced streams): while more than ``read_ahead_s`` of the reader's tokens wait here
        # unsent, the engine connection is not read (``upstream_pause(True)``, set by the engine reader); its
        # tokens gather in the socket and arrive in one read once fewer than half of that are left.
        self.upstream_pause: Callable[[bool], None] | None = None
        self._upstream_paused = False
        self._read_ahead_s = read_ahead_s if pacing != "none" else 0.0

    # --- BufferSource (gateway.policy.snapshot) ---
    @property
    def rate(self) -> float:
        return self.reader.rate

    @property
    def generated_tokens(self) -> int:
        return self.generated

    @property
    def first_token_time(self) -> float | None:
        return self.reader.first_token_time

    @property
    def stalled(self) -> bool:
        """The client stopped draining its socket (measured; see gateway.streams.drain)."""
        return self.drain is not None and self.drain.stalled

    def buffer_tokens(self, now: float) -> float:
        if self.drain is not None:  # evidence (acknowledged bytes, reported progress) beats the model
            r = self.reader
            r.advance(now)
            return float(r.produced - self.drain.consumed(now, r.consumed))
        return float(self.reader.buffer(now))

    def set_rate(self, rate: float, now: float) -> None:
        """Change the effective rate (from drain evidence); a paced stream is rescheduled at once."""
        self.reader.set_rate(rate, now)
        if self._scheduled and self._clock is not None:
            due = self.reader.due_time()  # inf once the reader has read every token: what is held is due now
            self._clock.schedule(self, now if due == math.inf else max(now, due))

    # --- producer side (upstream reader) ---
    def on_tokens(self, text: str, n: int, now: float, ids: list[int] | None = None) -> None:
        """``n`` tokens whose text is ``text`` arrived from the engine."""
        start = self.generated
        self.generated += n
        if self.collected is not None:
            self.reader.on_tokens(n, now)
            self.collected.append(text)
            return
        self.deltas.append((self.generated, text, ids))
        if self.generated <= self.base:
            return  # the attached client already has these (it resumed past them)
        self._emit(text, self.generated, self.generated - max(start, self.base), now)

    def on_deltas(self, deltas: list[Delta], now: float) -> None:
        """Deltas from the session store, ``(tokens after it, text, ids)`` in order; those this stream already
        has are skipped. Several new ones for a paced stream (one engine read's worth) are taken in one step:
        the reader model gets them at once (the same as one by one at the same instant) and the events are
        queued together."""
        gen = self.generated
        if (len(deltas) < 2 or self._clock is None or self.collected is not None or deltas[0][0] <= gen
                or gen < self.base or len(self._pending) + len(deltas) > self._max_pending):
            for end, text, ids in deltas:
                if end > self.generated:
                    self.on_tokens(text, end - self.generated, now, ids)
            return
        base, token, queue, log = self.base, self.encoder.token, self._pending.append, self.deltas.append
        end = gen
        for d in deltas:
            end = d[0]
            log(d)
            queue((end - base, token(d[1], end)))
        self.generated = end
        self.reader.on_tokens(end - gen, now)
        if self._read_ahead_s and not self._upstream_paused:
            self._bound_read_ahead(end)
        self._kick(now)

    def _emit(self, text: str, index: int, n: int, now: float) -> None:
        """Queue the event for a delta ending at token ``index``, ``n`` of whose tokens are new to the client."""
        self.reader.on_tokens(n, now)
        event = self.encoder.token(text, index)
        if self._clock is None:
            self._release(event, index - self.base)
        else:
            if len(self._pending) >= self._max_pending:
                # Explicit bound: merging keeps memory flat if a client is paced far behind its engine.
                end, ev = self._pending.pop()
                event = ev + event
            self._pending.append((index - self.base, event))
            if self._read_ahead_s and not self._upstream_paused:
                self._bound_read_ahead(index)
            self._kick(now)

    def _bound_read_ahead(self, index: int) -> None:
        """Stop reading the engine while more than ``read_ahead_s`` of tokens up to ``index`` wait unsent."""
        if (self.upstream_pause is not None
                and index - self.base - self.released_tokens > self.reader.rate * self._read_ahead_s):
            self._upstream_paused = True
            self.upstream_pause(True)

    def reattach(self, after: int, now: float) -> int:
        """A client (re)connects having received the tokens up to ``after``: serve it from there.

        The reader model restarts at ``now`` (the client resumes reading where it stopped), the tokens
        already produced after ``after`` are paced from now on, and the older writer, if any, is superseded.
        Returns the new attachment's sequence number for :meth:`next_output`.
        """
        self.base = after
        self.direct = None  # the older writer's; the new one installs its own
        self.resume_upstream()  # what was held back is gone from _pending: read on
        self.reader = ReaderModel(self.reader.rate)
        self._pending.clear()
        self._out.clear()
        self.client_done = False
        self.first_sent_time = None
        self.released_tokens = 0
        # Queue the whole replay before anything leaves (a release must see every event behind it to know
        # whether it is the last), then schedule afresh on the new reader's clock (older entries go stale).
        self._scheduled = True
        self.encoder.resumed(after > 0)
        prev = 0
        for end, text, _ in self.deltas:
            if end > after:
                self._emit(text, end, end - max(prev, after), now)
            prev = end
        if self.upstream_done:
            self.reader.finished = True
            self._queue_tail(self._tail(), now)
        self._scheduled = False
        if self._pending:
            self._kick(now)
        self.attach_seq += 1
        self.attached = True
        self._wake.set()
        return self.attach_seq

    def restore(self, deltas: list[Delta], final: tuple[str | None, int, tuple[str, str] | None] | None) -> None:
        """Load what another replica produced (no client attached yet): its deltas and, if it ended, how."""
        self.deltas = list(deltas)
        self.generated = deltas[-1][0] if deltas else 0
        self.base = self.generated
        if final is not None:
            self.upstream_done = True
            self.finish_reason, self.prompt_tokens, self.error = final
            self.reader.finished = True

    def mark_lost(self) -> None:
        """Another replica owns this stream now: end the client's connection so it resumes there."""
        self.lost = True
        self._wake.set()

    def on_finished(self, reason: str, prompt_tokens: int, completion_tokens: int | None, now: float) -> None:
        self.upstream_done = True
        self.finish_reason = reason
        self.prompt_tokens = prompt_tokens
        if completion_tokens is not None and completion_tokens > self.generated:
            # The engine counted tokens that carried no text (held-back bytes): account for them.
            extra = completion_tokens - self.generated
            self.generated = completion_tokens
            self.reader.on_tokens(extra, now)
        self.reader.finished = True
        if self.collected is not None:
            return
        self._queue_tail(self._tail(), now)

    def _tail(self) -> bytes:
        if self.error is not None:
            return self.encoder.error(*self.error)
        tail = self.encoder.finish(self.finish_reason or "stop", self.generated)
        if self.include_usage:
            tail += self.encoder.usage(self.prompt_tokens, self.generated, self.generated)
        return tail

    def on_error(self, message: str, code: str, now: float) -> None:
        self.upstream_done = True
        self.error = (message, code)
        self.reader.finished = True
        if self.collected is not None:
            return
        self._queue_tail(self.encoder.error(message, code), now)

    def _queue_tail(self, tail: bytes, now: float) -> None:
        if self._clock is None:
            self._release(tail, max(0, self.generated - self.base), last=True)
        else:
            self._pending.append((max(0, self.generated - self.base), tail))
            self._kick(now)

    def _kick(self, now: float) -> None:
        clock = self._clock
        if not self._scheduled and clock is not None:
            r = self.reader
            due = r.next_due if r.consumed < r.produced else now  # nothing left to read: a tail leaves at once
            if due <= now:
                # The reader is waiting for this token (the first one, or the engine is behind): release it now
                # rather than on the clock's next tick, which would be one more event-loop turn away.
                clock.lateness.observe(0.0)
                due = self.release_due(now)
                if due == math.inf:
                    return
            self._scheduled = True
            clock.schedule(self, max(now, due))

    # --- pacing clock side ---
    def release_due(self, now: float) -> float:
        """Release every event whose tokens the reader has reached by ``now``; return the next due time."""
        r = self.reader
        r.advance(now)
        consumed = r.consumed
        pending = self._pending
        if pending and pending[0][0] <= consumed:
            end, ev = pending.popleft()
            if pending and pending[0][0] <= consumed:  # several due: one write for all of them
                parts = [ev]
                while pending and pending[0][0] <= consumed:
                    end, ev = pending.popleft()
                    parts.append(ev)
                ev = b"".join(parts)
            direct = self.direct
            if direct is not None and pending and not self._out and direct(ev, end):  # the usual case, inlined
                self.released_tokens = end
            else:
                self._release(ev, end, last=not pending and self.upstream_done)
            if self._upstream_paused and r.produced - end <= 0.5 * r.rate * self._read_ahead_s:
                self.resume_upstream()
        if not pending:
            self._scheduled = False
            return math.inf
        # Events still pending lie beyond ``consumed``, so the reader has a token to come: due at next_due.
        return r.next_due

    def set_upstream(self, pause: Callable[[bool], None] | None) -> None:
        """The engine reader's pause switch (None once the engine stream ended or moved)."""
        self.upstream_pause = pause
        self._upstream_paused = False

    def resume_upstream(self) -> None:
        """Read the engine connection again (the read-ahead bound no longer holds it back)."""
        if self._upstream_paused:
            self._upstream_paused = False
            if self.upstream_pause is not None:
                self.upstream_pause(False)

    def _release(self, event: bytes, tokens: int, last: bool = False) -> None:
        direct = self.direct
        if direct is not None and not last and not self._out and direct(event, tokens):
            self.released_tokens = tokens
            return
        self._out.append(event)
        self.released_tokens = tokens
        if last:
            self.client_done = True
        self._wake.set()

    # --- consumer side (client writer) ---
    async def next_output(self, seq: int | None = None) -> bytes:
        """Wait until something is released; return it (possibly several events joined).

        With ``seq`` (from :meth:`reattach`), raise :class:`Superseded` once a newer connection attached, and
        return ``b""`` when the stream was lost to another replica.
        """
        while not self._out:
            if seq is not None and seq != self.attach_seq:
                raise Superseded(self.id)
            if self.lost:
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
