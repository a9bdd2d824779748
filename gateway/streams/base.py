"""What every request in flight has, streamed or not: identity, reader model, engine view, how it ends.

A :class:`StreamBase` is what the control loop schedules (a ``BufferSource`` of the policy's snapshot), what
``GET /v1/streams`` lists and what routing counts. Its two kinds: :class:`~gateway.streams.stream.Stream`
(server-sent events, paced, resumable) and :class:`~gateway.streams.collector.Collector` (a non-streaming
answer, returned whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

from .reader import ReaderModel

if TYPE_CHECKING:
    from ..api.sse import ChunkEncoder
    from ..engines.control_api import RequestState
    from .drain import DrainTracker

Pacing = Literal["smooth", "phrase", "none"]  # "phrase": gateway/streams/phrase_stream.py


class Upstream(Enum):
    """Where a stream's tokens come from, and whether more will come."""

    ENGINE = "engine"  # this replica reads them from the engine
    REPLICA = "replica"  # another replica reads the engine; this one follows its token log in the session store
    MOVED = "moved"  # another replica took the stream over while this one read it: clients here are sent there
    ENDED = "ended"  # the generation ended (finished or failed): no more tokens


ENDED = Upstream.ENDED


def pacing_of(value: str) -> Pacing:
    """A stored record's pacing mode (the session store keeps it as text); unknown ones pace smoothly."""
    return "none" if value == "none" else "phrase" if value == "phrase" else "smooth"


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSpec:
    """What a request asked for, fixed for its life (from the client's request, or from the session store's
    record when another replica's stream is rebuilt here)."""

    id: str
    engine: str
    model: str
    kind: str  # chat | completion
    rate: float  # tokens/s, as declared (or the default class)
    pacing: Pacing
    arrival_time: float  # on this process's monotonic clock
    max_tokens: int | None
    rate_declared: bool = True
    include_usage: bool = False


class StreamBase:
    __slots__ = (
        "arrival_time",
        "declared_rate",
        "drain",
        "encoder",
        "engine",
        "engine_request",
        "error",
        "finish_reason",
        "generated",
        "id",
        "kind",
        "max_tokens",
        "model",
        "pacing",
        "prompt_tokens",
        "rate_declared",
        "reader",
        "released_tokens",
        "upstream",
    )

    def __init__(self, spec: StreamSpec, encoder: ChunkEncoder) -> None:
        # The spec's fields, copied: the hot path reads them as plain attributes.
        self.id = spec.id
        self.engine = spec.engine
        self.model = spec.model
        self.kind = spec.kind
        self.pacing: Pacing = spec.pacing
        self.rate_declared = spec.rate_declared
        self.declared_rate = spec.rate  # as requested (or the default class); the effective rate may move off it
        self.arrival_time = spec.arrival_time
        self.max_tokens = spec.max_tokens
        self.reader = ReaderModel(spec.rate)
        self.encoder = encoder
        self.upstream = Upstream.ENGINE
        self.generated = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.error: tuple[str, str] | None = None  # (message, code)
        self.released_tokens = 0  # reader-relative token index through which events were released
        # The engine's last report on this request (from the control loop), for listings and metrics.
        self.engine_request: RequestState | None = None
        # Measured drain (gateway.streams.drain): the connection's evidence, when a writer tracks it.
        self.drain: DrainTracker | None = None

    @property
    def ended(self) -> bool:
        """The generation ended: every token this stream will have, it has."""
        return self.upstream is ENDED

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
