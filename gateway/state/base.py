"""The session store interface and the records it keeps."""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from ..streams.tokens import Delta, Final, tokens_in
from .published import PublishedStream, RemoteStream

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def valid_id(value: str) -> str:
    """``value`` if it is a safe id (stream, engine, replica); Redis key names are built only from these."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"invalid id {value!r}: expected [A-Za-z0-9._-]{{1,128}}")
    return value


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the caller serves from memory or answers 503."""


@dataclass(slots=True)
class StreamRecord:
    """What any replica needs to serve or continue a stream."""

    id: str
    engine: str
    model: str
    kind: str  # chat | completion
    rate: float
    pacing: str
    rate_declared: bool
    include_usage: bool
    max_tokens: int | None
    created: int  # unix seconds, part of every chunk
    arrival_wall: float = 0.0  # unix time the client's request arrived (scheduling order across replicas)
    key: str | None = None  # the API key (name) that created it: only that key may resume it
    body: dict[str, Any] = field(default_factory=dict)  # the engine request as first sent (for resubmission)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> StreamRecord:
        return cls(**orjson.loads(raw))


@dataclass(slots=True)
class Loaded:
    """A stream as the store knows it."""

    record: StreamRecord
    state: str  # running | detached | finished
    deltas: list[Delta]
    final: Final | None
    owner: str | None  # replica reading the engine, while its lease holds
    cursor: str = "0-0"  # position in the token log after ``deltas`` (for following)

    @property
    def tokens(self) -> int:
        return tokens_in(self.deltas)


# Callbacks the gateway gives the store.
Sink = Callable[[str, list[Delta], Final | None], None]  # tokens (and the end) ready for local delivery
Publisher = Callable[[], dict[str, list[PublishedStream]]]  # engine -> this replica's streams, each tick
Streams = Callable[[list[str]], None]  # stream ids the store reports on


class SessionStore(ABC):
    """Stream records, token logs and leases. Writes are queued and never block the data path.

    The gateway sets the callbacks below (gateway/lifecycle.py, gateway/relay.py); the defaults do nothing.
    """

    kind = "abstract"

    def __init__(self, replica_id: str) -> None:
        self.replica_id = valid_id(replica_id)
        self.degraded = False
        self.sink: Sink = lambda sid, deltas, final: None
        self.publisher: Publisher = dict
        self.on_claimed: Streams = lambda sids: None  # orphans this replica took over
        self.on_lost: Streams = lambda sids: None  # streams another replica owns now
        self.on_detached: Streams = lambda sids: None  # followed streams whose owner let them go (client left)
        self.on_reset: Callable[[], None] = lambda: None  # the store lost its data (Redis restarted empty)
        # Every delta of a stream held locally (durable or already sunk), to write it again after a reset.
        self.local_log: Callable[[str], list[Delta] | None] = lambda sid: None
        self._summaries: dict[str, tuple[dict[str, Any], float]] = {}  # engine -> (summary, unix time published)

    async def start(self) -> None:
        """Start background work (flushing, leases)."""

    async def close(self) -> None:
        """Flush what can be flushed and stop."""

    # --- owner side: queued, delivered to ``sink`` once durable (or at once when degraded) ---
    @abstractmethod
    def create(self, rec: StreamRecord, deltas: Sequence[Delta] | None = None) -> None: ...

    @abstractmethod
    def extend(self, sid: str, deltas: list[Delta]) -> None:
        """The deltas of one engine read, in order: one call per read rather than one per token."""

    def append(self, sid: str, delta: Delta) -> None:
        self.extend(sid, [delta])

    @abstractmethod
    def finish(self, sid: str, final: Final) -> None: ...

    def pending(self, sid: str) -> list[Delta]:
        """``sid``'s deltas written by this owner and not yet handed to ``sink`` (a write in flight); with what
        the sink had, the whole log so far."""
        return []

    @abstractmethod
    def release(self, sid: str) -> None:
        """The owner stops reading the engine (its client left): the stream may be resumed and resubmitted."""

    # --- any replica ---
    @abstractmethod
    async def load(self, sid: str) -> Loaded | None:
        """The stream's record and tokens; None if unknown or expired. Raises StoreUnavailable."""

    @abstractmethod
    async def claim(self, sid: str) -> bool:
        """Become the owner if the stream is detached or its owner's lease expired."""

    def adopt(self, sid: str) -> None:
        """This replica now owns ``sid`` (after claim): renew its lease."""

    def follow(self, sid: str, cursor: str) -> None:
        """Deliver ``sid``'s new tokens from ``cursor`` on to ``sink`` (another replica owns it)."""

    def unfollow(self, sid: str) -> None: ...

    def forget(self, sid: str) -> None:
        """This replica no longer reads or follows ``sid``."""

    def rewrite(self, rec: StreamRecord, deltas: Sequence[Delta], final: Final) -> None:
        """Write an ended stream again, whole, after the store lost it (a store that cannot lose data need not)."""

    # --- scheduling ---
    def is_driver(self, engine: str) -> bool:
        return True

    def remote_streams(self, engine: str, now: float) -> Iterable[RemoteStream]:
        return ()

    # --- placement: the engine summary its driver publishes, read by every replica ---
    def publish_summary(self, engine: str, summary: dict[str, Any]) -> None:
        """This replica drives ``engine``: its compact state for every replica's placement (one process: kept
        here; shared stores write it with their next tick)."""
        self._summaries[engine] = (summary, time.time())

    def engine_summary(self, engine: str) -> tuple[dict[str, Any], float] | None:
        """The latest summary published for ``engine`` and when (unix seconds), if any."""
        return self._summaries.get(engine)

    def status(self) -> dict[str, Any]:
        return {"store": self.kind, "status": "degraded" if self.degraded else "ok", "replica": self.replica_id}
