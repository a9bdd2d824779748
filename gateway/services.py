"""What a request's life needs from its process, handed over as one explicit object.

The gateway builds one :class:`Services` at start-up (inside the running event loop) and gives it to the
request lifecycle, the relay across replicas and the HTTP handlers; none of them reaches into the
application object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engines.client import EngineError

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .routing import EngineHandle, Engines
    from .state import SessionStore
    from .streams.base import StreamBase
    from .streams.drain import DrainSampler
    from .streams.pacer import PacingClock

log = logging.getLogger("tokenflow.gateway")


@dataclass(slots=True, kw_only=True, eq=False)
class Services:
    cfg: Config
    metrics: Metrics
    store: SessionStore  # stream records and token logs (memory, or Redis shared by replicas)
    engines: Engines
    streams: dict[str, StreamBase]  # every request in flight on this replica, by stream id
    clock: Callable[[], float]  # the event loop's monotonic clock
    pacer: PacingClock  # releases paced streams' tokens (one timer per process)
    drain: DrainSampler  # measures each client connection's real drain rate
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background (cancelled at shutdown)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def abort(self, engine: EngineHandle, sid: str) -> None:
        """End ``sid`` on its engine (logged, not raised, when the engine cannot be told)."""
        try:
            await engine.client.abort(sid)
        except EngineError as e:
            log.warning("abort failed", extra={"stream_id": sid, "engine": engine.name, "error": str(e)})

    def free_engine(self, engine: EngineHandle, sid: str) -> None:
        """A request's reader left before its engine finished: abort it in the background."""
        self.spawn(self.abort(engine, sid))
