"""Reading one engine stream into the gateway: the producer side of every request.

The deltas of each network read go, in one call, to the request's :class:`TokenSink`: the session store for a
streamed answer (which hands them to the local :class:`~gateway.streams.stream.Stream` once they are durable,
see gateway/lifecycle.py), the :class:`~gateway.streams.collector.Collector` of a non-streaming one.

:meth:`Pump.start` attaches the consumer synchronously, so the events that arrived with the engine's response
head (usually the first token) reach the stream before the request handler goes on to write the response:
no task wake-up lies on the first token's path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .engines.client import EngineDelta, EngineError, EngineStream
from .streams.tokens import Delta, Final

if TYPE_CHECKING:
    from .metrics import Metrics
    from .streams.flow import ReadAhead

log = logging.getLogger("tokenflow.gateway")


class TokenSink(Protocol):
    """Where a request's token log goes (the session store, or a non-streaming request's collector)."""

    def extend(self, sid: str, deltas: list[Delta]) -> None: ...

    def append(self, sid: str, delta: Delta) -> None: ...

    def finish(self, sid: str, final: Final) -> None: ...


class Pump:
    __slots__ = (
        "_tokens_in",
        "engine",
        "flow",
        "metrics",
        "on_failure",
        "produced",
        "prompt_tokens",
        "reason",
        "sid",
        "sink",
        "start_tokens",
        "upstream",
        "usage",
    )

    def __init__(self, *, engine: str, upstream: EngineStream, sid: str, sink: TokenSink, metrics: Metrics,
                 flow: ReadAhead | None = None, start: int = 0,
                 on_failure: Callable[[TokenSink, int, EngineError], None] | None = None,
                 prompt_tokens: int | None = None) -> None:
        self.engine = engine
        self.upstream = upstream
        self.sid = sid
        self.sink = sink
        self.metrics = metrics
        self.flow = flow  # a paced stream's read-ahead bound, which may pause reading the engine
        self.start_tokens = start  # tokens the stream had before this engine request (a resubmitted continuation)
        # Told (sink, tokens produced, error) when the engine stream fails; by default the sink ends in error.
        self.on_failure = on_failure
        self.produced = start
        # The client's prompt size when known (an engine reported it before failing): a continuation's own prompt
        # holds the output so far, retokenized, so subtracting ``start`` from it is only an estimate.
        self.prompt_tokens = prompt_tokens
        self.reason: str | None = None
        self.usage: dict[str, int] | None = None
        self._tokens_in = metrics.tokens_in.labels(engine)

    def start(self) -> asyncio.Task[None]:
        """Take the engine stream's events from now on (those already read, at once), and read on in a task
        until the stream ends."""
        if self.flow is not None:
            self.flow.connect(self.upstream.pause_reading)
        self.upstream.attach(self.on_batch)
        return asyncio.ensure_future(self._run())

    def on_batch(self, batch: list[EngineDelta]) -> None:
        """All the events of one network read, in the read's callback: one hand-over to the sink."""
        produced = before = self.produced
        logged: list[Delta] = []
        for d in batch:
            if d.tokens or d.text:
                produced += d.tokens or 1
                logged.append((produced, d.text, None))
            if d.finish_reason:
                self.reason = d.finish_reason
            if d.usage:
                self.usage = d.usage
        self.produced = produced
        if logged:
            self.sink.extend(self.sid, logged)
        self._tokens_in.value += produced - before

    async def _run(self) -> None:
        sink, sid = self.sink, self.sid
        try:
            await self.upstream.wait()
            usage = self.usage or {}
            # A continuation's prompt holds the output so far.
            prompt = (self.prompt_tokens if self.prompt_tokens is not None
                      else max(0, int(usage.get("prompt_tokens", 0)) - self.start_tokens))
            completion = usage.get("completion_tokens")
            if completion is not None and self.start_tokens + completion > self.produced:  # tokens that carried no text
                self.produced = self.start_tokens + completion
                sink.append(sid, (self.produced, "", None))
            sink.finish(sid, Final(self.reason or "stop", prompt))
        except asyncio.CancelledError:
            raise
        except EngineError as e:
            self.metrics.errors.labels("engine_stream").inc()
            log.warning("engine stream failed", extra={"stream_id": sid, "engine": self.engine, "error": str(e)})
            if self.on_failure is not None:
                self.on_failure(sink, self.produced, e)
            else:
                sink.finish(sid, Final(None, 0, (f"the engine stream failed: {e}", "engine_stream_failed")))
        finally:
            if self.flow is not None:
                self.flow.connect(None)
            self.upstream.close()

