"""Session state shared by gateway replicas: stream records, token logs, ownership and driver leases.

``MemoryStore`` serves one replica (the default); ``RedisStore`` lets several replicas behind a load balancer
resume each other's streams and share one scheduler per engine. docs/replicas.md describes the design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..streams.tokens import Final
from .base import Loaded, SessionStore, StoreUnavailable, StreamRecord, valid_id
from .metrics import SessionStats
from .published import PublishedStream, RemoteStream

if TYPE_CHECKING:
    from ..config import SessionConfig

__all__ = [
    "Final",
    "Loaded",
    "PublishedStream",
    "RemoteStream",
    "SessionStats",
    "SessionStore",
    "StoreUnavailable",
    "StreamRecord",
    "make_store",
    "valid_id",
]


def make_store(cfg: SessionConfig, engines: list[str]) -> SessionStore:
    if cfg.store == "redis":
        from .redis_store import RedisStore

        return RedisStore(cfg, engines)
    from .memory import MemoryStore

    return MemoryStore(cfg, engines)
