"""Reading one engine stream into the gateway: the producer side of every request.

Streaming requests go through the session store (which hands the deltas to the local
:class:`~gateway.streams.stream.Stream` once they are durable, see gateway/relay.py); non-streaming ones go
straight into their Stream, which collects the text.

:meth:`Pump.start` attaches the consumer synchronously, so the events that arrived with the engine's response
head (usually the first token) reach the stream before the request handler goes on to write the response:
no task wake-up lies on the first token's path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from .engines.client import Delta, EngineError, EngineStream
from .state import Final

if TYPE_CHECKING:
    from .app import EngineHandle, Gateway
    from .streams.stream import Stream

log = logging.getLogger("tokenflow.gateway")


class Pump:
    __slots__ = ("gw", "engine", "upstream", "stream", "start_tokens", "produced", "reason", "usage", "_store", "_tokens_in")

    def __init__(self, gw: "Gateway", engine: "EngineHandle", upstream: EngineStream, stream: "Stream", start: int = 0) -> None:
        self.gw = gw
        self.engine = engine
        self.upstream = upstream
        self.stream = stream
        self.start_tokens = start  # tokens the stream had before this engine request (a resubmitted continuation)
        self.produced = start
        self.reason: str | None = None
        self.usage: dict[str, int] | None = None
        self._store = gw.store if stream.collected is None else None
        self._tokens_in = gw.metrics.tokens_in.labels(engine.config.name)

    def start(self) -> "asyncio.Task[None]":
        """Take the engine stream's events from now on (those already read, at once), and read on in a task
        until the stream ends."""
        if self._store is not None:  # the read-ahead bound of a paced stream (Stream._emit) may pause reading
            self.stream.set_upstream(self.upstream.pause_reading)
        self.upstream.attach(self.on_batch)
        return asyncio.ensure_future(self._run())

    def on_batch(self, batch: list[Delta]) -> None:
        """All the events of one network read, in the read's callback."""
        produced = before = self.produced
        store = self._store
        logged: list[tuple[int, str, None]] = []  # for the store: handed over in one call per read
        for d in batch:
            if d.tokens or d.text:
                n = d.tokens or 1
                produced += n
                if store is not None:
                    logged.append((produced, d.text, None))
                else:
                    self.stream.on_tokens(d.text, n, self.gw.loop_time())
            if d.finish_reason:
                self.reason = d.finish_reason
            if d.usage:
                self.usage = d.usage
        self.produced = produced
        if logged:
            store.extend(self.stream.id, logged)  # type: ignore[union-attr]
        self._tokens_in.value += produced - before

    async def _run(self) -> None:
        stream, store, sid = self.stream, self._store, self.stream.id
        clock = self.gw.loop_time
        try:
            await self.upstream.wait()
            usage = self.usage or {}
            prompt = max(0, int(usage.get("prompt_tokens", 0)) - self.start_tokens)  # a continuation's prompt holds the output
            completion = usage.get("completion_tokens")
            if store is None:
                stream.on_finished(self.reason or "stop", prompt, completion, clock())
            else:
                if completion is not None and self.start_tokens + completion > self.produced:  # tokens that carried no text
                    self.produced = self.start_tokens + completion
                    store.append(sid, (self.produced, "", None))
                store.finish(sid, Final(self.reason or "stop", prompt))
        except asyncio.CancelledError:
            raise
        except (EngineError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            name = self.engine.config.name
            self.gw.metrics.errors.labels("engine_stream").inc()
            log.warning("engine stream failed", extra={"stream_id": sid, "engine": name, "error": str(e)})
            if store is None:
                stream.on_error(f"the engine stream failed: {e}", "engine_stream_failed", clock())
            else:
                store.finish(sid, Final(None, 0, (f"the engine stream failed: {e}", "engine_stream_failed")))
        finally:
            if stream.upstream_pause is not None:
                stream.set_upstream(None)
            self.upstream.close()
