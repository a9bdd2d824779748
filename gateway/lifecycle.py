"""The life of one request on this replica, streamed or not: open, admit, submit, deliver, tear down.

::

    open     parse the body, route it to an engine, admit it (stream limits), name it
    submit   open the engine stream; a Pump reads it into the request's token sink
    deliver  streamed:     Pump -> session store -> on_durable -> Stream -> pacing clock -> client socket
             not streamed: Pump -> Collector -> the whole answer once the engine ends
    tear     a stream leaves the registry once both its client writer and its engine reader are done; a client
    down     that leaves mid-answer frees the engine at once (the stream stays resumable from the store)

An engine that fails mid-answer (killed, frozen, stalled, a broken stream) hands the request to another engine of
its model: the continuation (prompt + what was produced, gateway/resume.py) goes there and the token log goes on at
the same sequence numbers, so the client sees nothing lost or repeated (``streams.max_failovers`` bounds it).

Resumption across replicas (reconnects, following another replica, take-overs) builds on these steps in
gateway/relay.py. Everything from the process comes through :class:`~gateway.services.Services`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from . import auth
from .api.errors import ApiError, at_capacity
from .api.requests import Kind, parse_json, parse_request
from .api.responses import SSE_HEADERS, json_response
from .api.sse import DONE, ChunkEncoder
from .engines.client import EngineDown, EngineError, EngineStalled, EngineStream, EngineTimeout
from .pump import Pump, TokenSink
from .resume import NotResumable, continuation_body
from .routing import placement_request
from .state import StreamRecord
from .streams.base import StreamBase, StreamSpec, Upstream
from .streams.collector import Collector
from .streams.direct import direct_sender
from .streams.phrase_stream import stream_class
from .streams.stream import Stream, Superseded
from .streams.tokens import Delta, Final, tokens_in

if TYPE_CHECKING:
    from .routing import EngineHandle
    from .services import Services

log = logging.getLogger("tokenflow.gateway")

# How long a resubmission retries while the engine still holds the dead request's id.
_DUPLICATE_RETRY_S = 5.0


def engine_request(body: dict[str, Any], sid: str) -> dict[str, Any]:
    """The body sent to the engine: the client's request, always streamed, with token ids and usage, and the
    stream's id for the control API (docs/engine-control-api.md)."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
            "vllm_xargs": {"tokenflow_id": sid}}


class RequestLifecycle:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.pumps: dict[str, asyncio.Task[None]] = {}  # engine readers of the streamed answers this replica owns
        self.keys: dict[str, str | None] = {}  # stream -> name of the API key that may resume it
        # For failover, per request in flight: the engine request as first sent, how often it moved, and the
        # client's prompt size once an engine reported it (a continuation's own prompt holds the output).
        self.origins: dict[str, dict[str, Any]] = {}
        self.moves: dict[str, int] = {}
        self.prompts: dict[str, int] = {}
        self.failures: dict[str, tuple[EngineHandle, int, EngineError, int]] = {}  # a Collector's, for _collect
        svc.store.sink = self.on_durable

    # ----- open and admit -----
    async def serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        """``POST /v1/chat/completions`` or ``/v1/completions`` (a new generation)."""
        svc = self.svc
        arrival = svc.clock()
        body = parse_json(await request.read())
        creq = parse_request(body, kind, request.headers, svc.cfg.streams, svc.engines.models)
        engine = svc.engines.route(creq.model, svc.streams.values(), svc.cfg.auth.retry_after_s,
                                   placement_request(creq))
        self.admit(kind)
        sid = uuid.uuid4().hex[:24]
        auth.admit(request, creq, engine.name, sid, svc.cfg.streams)  # the API key's default rate
        encoder = ChunkEncoder(kind, sid, creq.model, int(time.time()))
        self.keys[sid] = auth.key_name(request)  # who may see it (GET /v1/streams) and resume it
        spec = StreamSpec(id=sid, engine=engine.name, model=creq.model, kind=kind, rate=creq.rate,
                          pacing=creq.pacing if creq.stream else "none", arrival_time=arrival,
                          max_tokens=creq.max_tokens, rate_declared=creq.rate_declared,
                          include_usage=creq.include_usage)
        if not creq.stream:
            return await self._collect(Collector(spec, encoder, clock=svc.clock), engine, creq.engine_body)
        return await self._stream(request, self.new_stream(spec, encoder), engine, creq.engine_body)

    def admit(self, kind: str | None = None) -> None:
        """The gateway-wide stream limit (``server.max_streams``); ``kind`` counts a rejected new request."""
        svc = self.svc
        if len(svc.streams) >= svc.cfg.server.max_streams:
            if kind is not None:
                svc.metrics.requests.labels(kind, "rejected").inc()
            raise at_capacity("the gateway is at its stream limit; retry shortly", "too_many_streams",
                              svc.cfg.auth.retry_after_s)

    def new_stream(self, spec: StreamSpec, encoder: ChunkEncoder) -> Stream:
        """A streamed answer (a PhraseStream for ``pacing: phrase``) with this process's pacing clock and the
        configured bounds."""
        cfg = self.svc.cfg.streams
        return stream_class(spec.pacing)(spec, encoder, clock=self.svc.pacer, max_pending=cfg.max_buffered_chunks,
                                         read_ahead_s=cfg.engine_read_ahead_s)

    def record(self, stream: Stream, body: dict[str, Any]) -> StreamRecord:
        """What any replica needs to serve or continue ``stream`` (kept in the session store)."""
        wall = time.time() - (self.svc.clock() - stream.arrival_time)
        return StreamRecord(stream.id, stream.engine, stream.model, stream.kind, stream.rate, stream.pacing,
                            stream.rate_declared, stream.include_usage, stream.max_tokens, stream.encoder.created,
                            arrival_wall=wall, key=self.keys.get(stream.id), body=body)

    # ----- submit -----
    async def submit(self, stream: Stream, engine: EngineHandle, body: dict[str, Any], start: int,
                     origin: dict[str, Any] | None = None, tried: set[str] | None = None) -> None:
        """Open ``stream``'s engine request (a continuation after ``start`` tokens, if any) and read it into the
        session store; this replica owns the stream from now on. ``origin``: the request as first sent, which a
        failover continues (by default ``body``); ``tried``: engines not to pass over to (see :meth:`_open_any`)."""
        self.origins.setdefault(stream.id, body if origin is None else origin)
        engine, upstream = await self._open_any(stream, engine, body, start, tried)
        self._read(stream, engine, upstream, start)

    def _read(self, stream: Stream, engine: EngineHandle, upstream: EngineStream, start: int) -> None:
        stream.upstream = Upstream.ENGINE
        task = self._pump(stream, engine, upstream, self.svc.store, start)
        # Registered at once: a failover in progress (the pump task it replaces) must be cancelled with it.
        self.pumps[stream.id] = task
        task.add_done_callback(partial(self._pump_done, stream))

    async def _open_any(self, s: StreamBase, engine: EngineHandle, body: dict[str, Any], start: int,
                        tried: set[str] | None = None) -> tuple[EngineHandle, EngineStream]:
        """The engine stream on ``engine``, or on another of the model when ``engine`` cannot take it (marked down,
        unreachable or broken: 5xx, for example killed a moment ago and not marked down yet): a failover before
        the request's first token there. ``tried`` (engines that already failed it) grows with each one tried."""
        tried = set() if tried is None else tried
        tried.add(engine.name)
        while True:
            try:
                return engine, await self._open(s, engine, body, start)
            except ApiError as e:
                if e.status < 500:
                    raise
                failed = engine.name
                nxt = self._next_engine(s, tried)
                if isinstance(nxt, str):
                    raise
                engine = nxt
                self.svc.metrics.failovers.labels(failed, "rerouted").inc()

    async def _open(self, s: StreamBase, engine: EngineHandle, body: dict[str, Any], start: int) -> EngineStream:
        """The engine stream, retrying a resubmission while the engine still knows the dead request's id."""
        svc = self.svc
        upstream_body = engine_request(body, s.id)
        deadline = svc.clock() + (_DUPLICATE_RETRY_S if start else 0.0)
        while True:
            try:
                return await engine.client.open_stream(s.kind, upstream_body, s.id)
            except EngineError as e:
                if e.code == "duplicate_id" and svc.clock() < deadline:
                    await svc.abort(engine, s.id)  # the old request outlived its reader: end it
                    await asyncio.sleep(0.1)
                    continue
                svc.metrics.errors.labels("engine_unavailable" if e.status >= 500 else "engine_rejected").inc()
                if e.status >= 500:
                    retry = {"Retry-After": str(svc.cfg.auth.retry_after_s)} if e.status == 503 else None
                    raise ApiError(e.status, str(e), type="server_error", code="engine_unavailable",
                                   headers=retry) from None
                raise ApiError(e.status, str(e), code="engine_rejected") from None

    def _pump(self, s: StreamBase, engine: EngineHandle, upstream: EngineStream, sink: TokenSink,
              start: int = 0) -> asyncio.Task[None]:
        flow = s.flow if isinstance(s, Stream) else None
        return Pump(engine=engine.name, upstream=upstream, sid=s.id, sink=sink, metrics=self.svc.metrics, flow=flow,
                    start=start, on_failure=partial(self.engine_failed, s, engine, start=start),
                    prompt_tokens=self.prompts.get(s.id)).start()

    # ----- failover -----
    def engine_failed(self, s: StreamBase, engine: EngineHandle, sink: TokenSink, produced: int,
                      error: EngineError, *, start: int = 0) -> None:
        """``s``'s engine stream (opened after ``start`` tokens) failed after ``produced`` tokens (all in ``sink``):
        refused mid-answer, broken, judged down (``EngineDown``) or stalled (``EngineStalled``). The request moves
        to another engine of its model when one is up (:meth:`_fail_over`); otherwise it ends with an error event
        whose code says which, and the client may resume it (``Last-Event-ID``) and gets what was produced,
        nothing twice."""
        if start == 0 and s.engine_request is not None and s.id not in self.prompts:
            self.prompts[s.id] = s.engine_request.prompt_tokens  # the engine saw the client's own prompt
        if self.svc.cfg.streams.max_failovers == 0:
            sink.finish(s.id, _failure_final(error))
        elif isinstance(s, Stream):
            # Stands in for the pump until the continuation's reader replaces it: a client leaving meanwhile
            # cancels it (stop_reading), and the stream is not torn down as readerless.
            task = asyncio.ensure_future(self._fail_over_stream(s, engine, sink, produced, error))
            self.pumps[s.id] = task
            task.add_done_callback(partial(self._pump_done, s))
        else:
            self.failures[s.id] = (engine, produced, error, start)  # _collect goes on with it

    async def _fail_over_stream(self, s: Stream, failed: EngineHandle, sink: TokenSink, produced: int,
                                error: EngineError) -> None:
        await self._fail_over(s, failed, sink, produced, error)  # (the continuation's reader registers itself)

    async def _fail_over(self, s: StreamBase, failed: EngineHandle, sink: TokenSink, produced: int,
                         error: EngineError) -> asyncio.Task[None] | None:
        """Continue ``s`` on another engine of its model after ``produced`` tokens: the reader of the continuation,
        or None when none could take it (then ``s`` ended with the failed engine's error)."""
        svc = self.svc
        svc.free_engine(failed, s.id)  # best effort: a dead or frozen engine does not answer
        log_ = self._produced(s)
        origin = self.origins.get(s.id)
        why = "no other engine of the model is up"
        body: dict[str, Any] | None = None
        if origin is None or tokens_in(log_) != produced:  # (a guard: the log is whole by construction)
            why = "what was produced is not known whole"
        else:
            try:
                body = continuation_body(s.kind, origin, log_)
            except NotResumable as e:
                why = str(e)
            else:
                if body is None:  # the engine failed after the last token it owed: the answer is complete
                    sink.finish(s.id, Final("length", self.prompts.get(s.id, 0)))
                    return None
        tried = {failed.name}
        while body is not None:
            target = self._next_engine(s, tried)
            if isinstance(target, str):
                why = target
                break
            try:
                if isinstance(s, Stream):
                    await self.submit(s, target, body, produced, tried=tried)
                    task = self.pumps[s.id]
                else:
                    target, upstream = await self._open_any(s, target, body, produced, tried)
                    task = self._pump(s, target, upstream, sink, produced)
            except ApiError as e:
                why = e.message
                continue
            svc.metrics.failovers.labels(failed.name, "continued").inc()
            log.warning("request moved to another engine", extra={
                "stream_id": s.id, "engine": s.engine, "from": failed.name, "tokens": produced, "error": str(error)})
            return task
        svc.metrics.failovers.labels(failed.name, "ended").inc()
        log.warning("request ended with its engine", extra={"stream_id": s.id, "engine": failed.name, "why": why})
        sink.finish(s.id, _failure_final(error))
        return None

    def _next_engine(self, s: StreamBase, tried: set[str]) -> EngineHandle | str:
        """Another engine of ``s``'s model, serving ``s`` from now on: up, not in ``tried`` (which it joins), within
        ``streams.max_failovers``; or why there is none."""
        svc = self.svc
        moves = self.moves.get(s.id, 0)
        if moves >= svc.cfg.streams.max_failovers:
            return f"it moved {moves} times already (streams.max_failovers)"
        try:
            target = svc.engines.route(s.model, svc.streams.values(), svc.cfg.auth.retry_after_s, exclude=tried)
        except ApiError as e:
            return e.message
        self.moves[s.id] = moves + 1
        tried.add(target.name)
        self._move(s, target)
        return target

    def _produced(self, s: StreamBase) -> list[Delta]:
        """Every token ``s`` got so far, as its log: a Stream's durable deltas and those still being written; a
        Collector's text as one entry."""
        if isinstance(s, Stream):
            return list(s.deltas) + self.svc.store.pending(s.id)
        if isinstance(s, Collector) and s.generated:
            return [(s.generated, "".join(s.parts), None)]
        return []

    def _move(self, s: StreamBase, target: EngineHandle) -> None:
        """``s`` is served by ``target`` from now on: its engine label (metrics, listings, routing load) and the
        old engine's scheduling state for it."""
        svc = self.svc
        old = svc.engines.get(s.engine)
        if old is not None:
            old.control.policy.forget(s.id)
        if svc.streams.get(s.id) is s:
            svc.metrics.streams_active.labels(s.engine).dec()
            svc.metrics.streams_active.labels(target.name).inc()
        s.engine = target.name
        s.engine_request = None  # the old engine's view; the new engine's control loop reports its own

    def _pump_done(self, stream: Stream, task: asyncio.Task[None]) -> None:
        if self.pumps.get(stream.id) is task:
            del self.pumps[stream.id]
        if not stream.attached and self.svc.streams.get(stream.id) is stream and stream.id not in self.pumps:
            self.remove(stream)

    # ----- deliver: a streamed answer -----
    async def _stream(self, request: web.Request, stream: Stream, engine: EngineHandle, body: dict[str, Any]
                      ) -> web.StreamResponse:
        """Record the new stream (resumable), submit it to the engine, deliver it to this client."""
        sid = stream.id
        self.svc.store.create(self.record(stream, body))
        self.register(stream)
        self.origins[sid] = body
        try:
            engine, upstream = await self._open_any(stream, engine, body, 0)
            self._read(stream, engine, upstream, 0)
        except BaseException as e:
            if isinstance(e, ApiError):
                self.svc.store.finish(sid, Final(None, 0, (e.message, e.code or "engine_error")))
            else:
                self.svc.store.release(sid)
            self.remove(stream)
            raise
        stream.attach()
        return await self.deliver(request, stream, stream.attach_seq)

    def on_durable(self, sid: str, deltas: list[Delta], final: Final | None) -> None:
        """The session store's sink: tokens (and the end) that are durable, or that degraded mode serves from
        memory, go to the local stream."""
        s = self.svc.streams.get(sid)
        if not isinstance(s, Stream):
            return
        now = self.svc.clock()
        if deltas:
            s.on_deltas(deltas, now)
        if final is not None and not s.ended:
            if final.error is not None:
                s.on_error(final.error[0], final.error[1], now)
            else:
                s.on_finished(final.reason or "stop", final.prompt_tokens, None, now)
            if not s.attached and s.id not in self.pumps:
                self.remove(s)

    async def deliver(self, request: web.Request, stream: Stream, seq: int) -> web.StreamResponse:
        """Send ``stream`` to this client connection (attachment ``seq``) until its end, the client leaves, a
        newer connection takes over or the stream moves to another replica."""
        try:
            return await self._write(request, stream, seq)
        finally:
            self._writer_exit(stream, seq)

    async def _write(self, request: web.Request, stream: Stream, seq: int) -> web.StreamResponse:
        svc = self.svc
        resp = web.StreamResponse(headers={**SSE_HEADERS, "X-TokenFlow-Stream-Id": stream.id})
        writer = await resp.prepare(request)
        drain = svc.drain.attach(  # measured drain: what this connection really takes (docs/drain-rate.md)
            stream, request.transport, writer, declared=stream.declared_rate if stream.rate_declared else None,
            default_rate=stream.declared_rate, owner=auth.key_name(request),
        )
        name = stream.engine
        first = True
        outcome = "disconnected"
        direct = None
        try:
            while True:
                data = await stream.next_output(seq)
                if not data:  # another replica owns the stream now: end without [DONE]; the client resumes there
                    outcome = "moved"
                    return resp
                released = stream.released_tokens
                await resp.write(data)
                if drain is not None:
                    drain.on_write(released)
                if first:
                    first = False
                    stream.first_sent_time = svc.clock()
                    svc.metrics.ttft.labels(name).observe(stream.first_sent_time - stream.arrival_time)
                    if seq == stream.attach_seq:  # from now on releases may go straight out
                        stream.direct = direct = direct_sender(stream, writer, request.transport, drain, seq)
                if stream.complete:
                    break
            await resp.write(DONE)
            await resp.write_eof()
            outcome = "error" if stream.error else "completed"
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        except Superseded:  # the client reconnected: the newer connection carries on
            outcome = "superseded"
        finally:
            if direct is not None and stream.direct is direct:
                stream.direct = None
            svc.metrics.requests.labels(stream.kind, outcome).inc()
            delivered = stream.generated - stream.base if stream.pacing == "none" else stream.reader.consumed
            # (a client that resumed after more tokens than exist yet was delivered none)
            svc.metrics.tokens_out.labels(stream.engine).inc(max(0, delivered))  # (the engine it ended on)
            svc.drain.detach(stream, drain)
        return resp

    def _writer_exit(self, stream: Stream, seq: int) -> None:
        if stream.attach_seq != seq:
            return  # a newer connection serves this stream now
        complete = stream.complete
        stream.detach()
        if self.svc.streams.get(stream.id) is not stream:
            return
        pump = self.pumps.get(stream.id)
        if pump is not None and not pump.done():
            if complete:
                return  # everything was sent; the pump ends on its own (removal then)
            # The client left mid-stream: free the engine now. The stream stays resumable from the store; a
            # reconnecting client gets the continuation resubmitted.
            self.stop_reading(stream.id, stream.engine)
            self.svc.store.release(stream.id)
        self.remove(stream)

    def stop_reading(self, sid: str, engine_name: str | None) -> None:
        """Stop reading stream ``sid``'s engine, and end its request on ``engine_name`` (when known)."""
        pump = self.pumps.pop(sid, None)
        if pump is not None and not pump.done():
            pump.cancel()
            engine = self.svc.engines.get(engine_name) if engine_name is not None else None
            if engine is not None:
                self.svc.free_engine(engine, sid)

    # ----- deliver: a non-streaming answer -----
    async def _collect(self, c: Collector, engine: EngineHandle, body: dict[str, Any]) -> web.Response:
        """Not paced: returned whole when the engine finishes."""
        svc = self.svc
        self.register(c)
        self.origins[c.id] = body
        pump: asyncio.Task[None] | None = None
        try:
            engine, upstream = await self._open_any(c, engine, body, 0)
            pump = self._pump(c, engine, upstream, c)
            await pump
            while (failure := self.failures.pop(c.id, None)) is not None:  # its engine failed: try another
                failed, produced, error, _ = failure
                pump = await self._fail_over(c, failed, c, produced, error)
                if pump is None:
                    break
                await pump
            if c.error is not None:
                svc.metrics.requests.labels(c.kind, "error").inc()
                if c.error[1] == "engine_down":  # nothing was sent yet: the client may retry (another engine)
                    raise ApiError(503, c.error[0], type="server_error", code=c.error[1],
                                   headers={"Retry-After": str(svc.cfg.auth.retry_after_s)})
                raise ApiError(502, c.error[0], type="server_error", code=c.error[1])
            svc.metrics.requests.labels(c.kind, "completed").inc()
            if c.first_token_time is not None:  # not paced: the first token is ready when it is produced
                svc.metrics.ttft.labels(c.engine).observe(c.first_token_time - c.arrival_time)
            svc.metrics.tokens_out.labels(c.engine).inc(c.generated)
            return json_response(c.answer())
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if not c.ended:  # client gone (or gateway error) before the engine finished: free the engine now
                current = svc.engines.get(c.engine)
                if current is not None:
                    svc.free_engine(current, c.id)
            self.remove(c)

    # ----- the registry -----
    def register(self, s: StreamBase) -> None:
        self.svc.streams[s.id] = s
        self.svc.metrics.streams_active.labels(s.engine).inc()

    def remove(self, s: StreamBase) -> None:
        """``s`` leaves this replica: its registry entry, its store subscription, its policy state, its metrics."""
        svc = self.svc
        if svc.streams.get(s.id) is not s:
            return
        del svc.streams[s.id]
        self.keys.pop(s.id, None)
        self.origins.pop(s.id, None)
        self.moves.pop(s.id, None)
        self.prompts.pop(s.id, None)
        self.failures.pop(s.id, None)
        svc.store.forget(s.id)
        engine = svc.engines.get(s.engine)
        if engine is not None:
            engine.control.policy.forget(s.id)
        svc.metrics.streams_active.labels(s.engine).dec()
        svc.metrics.stall_seconds.labels(s.engine).inc(s.reader.stall_time_at(svc.clock()))

    def close(self) -> None:
        for t in list(self.pumps.values()):
            t.cancel()


def _failure_final(error: EngineError) -> Final:
    """How a request ends when its engine failed and no other took it: an error event whose code says why."""
    code = ("engine_down" if isinstance(error, EngineDown) else "engine_stalled" if isinstance(error, EngineStalled)
            else "engine_timeout" if isinstance(error, EngineTimeout) else "engine_stream_failed")
    return Final(None, 0, (f"the engine stream failed: {error}", code))
