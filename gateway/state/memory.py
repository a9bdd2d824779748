"""The in-memory session store: one replica, no network. Resumption works within this process."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..streams.tokens import Delta, Final, TokenLog
from .base import Loaded, SessionStore, StreamRecord

if TYPE_CHECKING:
    from ..config import SessionConfig


def default_replica_id() -> str:
    """Host name, process id and a random suffix: unique across restarts of the same pod."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Entry:
    record: StreamRecord
    state: str = "running"
    deltas: TokenLog = field(default_factory=TokenLog)  # compact: kept until the record expires
    final: Final | None = None
    expires_at: float | None = None  # set when the stream ends or is released


class MemoryStore(SessionStore):
    kind = "memory"

    def __init__(self, cfg: SessionConfig, engines: list[str]) -> None:
        super().__init__(cfg.replica_id or default_replica_id())
        self.ttl_s = cfg.ttl_s
        self.max_streams = cfg.max_records
        self._entries: dict[str, _Entry] = {}
        self._next_sweep = 0.0

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        dead = [k for k, e in self._entries.items() if e.expires_at is not None and e.expires_at <= now]
        for k in dead:
            del self._entries[k]

    def _bound(self) -> None:
        """At most ``max_records``: the oldest ended records go first (running ones are bounded by max_streams)."""
        excess = len(self._entries) + 1 - self.max_streams
        if excess <= 0:
            return
        ended = sorted((e.expires_at, k) for k, e in self._entries.items() if e.expires_at is not None)
        for _, k in ended[:excess]:
            del self._entries[k]

    def create(self, rec: StreamRecord, deltas: Sequence[Delta] | None = None) -> None:
        self._sweep()
        e = self._entries.get(rec.id)
        if e is None:
            self._bound()
            self._entries[rec.id] = _Entry(rec, deltas=TokenLog(deltas or ()))
        else:  # resubmission of a known stream: keep its tokens
            e.state, e.expires_at = "running", None

    def extend(self, sid: str, deltas: list[Delta]) -> None:
        e = self._entries.get(sid)
        if e is not None:
            e.deltas.extend(deltas)
        self.sink(sid, deltas, None)

    def finish(self, sid: str, final: Final) -> None:
        e = self._entries.get(sid)
        if e is not None:
            e.state, e.final, e.expires_at = "finished", final, time.monotonic() + self.ttl_s
        self.sink(sid, [], final)

    def release(self, sid: str) -> None:
        e = self._entries.get(sid)
        if e is not None and e.state == "running":
            e.state, e.expires_at = "detached", time.monotonic() + self.ttl_s

    async def load(self, sid: str) -> Loaded | None:
        self._sweep()
        e = self._entries.get(sid)
        if e is None:
            return None
        owner = self.replica_id if e.state == "running" else None
        return Loaded(e.record, e.state, list(e.deltas), e.final, owner, str(len(e.deltas)))

    async def claim(self, sid: str) -> bool:
        e = self._entries.get(sid)
        if e is None or e.state != "detached":
            return False
        e.state, e.expires_at = "running", None
        return True

    def __len__(self) -> int:
        return len(self._entries)
