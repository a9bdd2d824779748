"""The gateway's aiohttp application: wiring of the API, streams, pacing clock, engines and control loops."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import __version__, auth
from .api.errors import ApiError, invalid, not_found
from .api.requests import ClientRequest, parse_json, parse_request
from .api.sse import DONE, ChunkEncoder, usage_dict
from .config import Config, EngineConfig
from .control import ControlLoop
from .engines.client import EngineClient, EngineError
from .metrics import Metrics
from .policy import make_policy
from .pump import Pump
from .relay import Relay
from .state import SessionStore, make_store
from .state.metrics import SessionCollector
from .streams import progress
from .streams.direct import direct_sender
from .streams.drain import DrainSampler, settings_from, stream_fields
from .streams.pacer import LatenessCollector, PacingClock
from .streams.phrase_stream import stream_class
from .streams.stream import Stream, Superseded

log = logging.getLogger("tokenflow.gateway")

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer
}

GATEWAY_KEY: web.AppKey["Gateway"] = web.AppKey("gateway", object)  # type: ignore[arg-type]


@dataclass(slots=True)
class EngineHandle:
    config: EngineConfig
    client: EngineClient
    control: ControlLoop
    models: list[str]
    embedded: Any = None  # the in-process simulated engine, when embedded


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.streams: dict[str, Stream] = {}
        self.engines: dict[str, EngineHandle] = {}
        self._model_routes: dict[str, EngineHandle] = {}
        self._model_engines: dict[str, list[EngineHandle]] = {}  # every engine serving a model, for balancing
        self._session: aiohttp.ClientSession | None = None
        self._clock: PacingClock | None = None
        self.drain: DrainSampler | None = None  # measured client drain, one sampler per process
        self._background: set[asyncio.Task[Any]] = set()
        self.loop_time: Callable[[], float] = time.monotonic
        # Session state (records, token logs, leases) and the cross-replica data path (gateway/relay.py).
        self.store: SessionStore = make_store(cfg.session, [e.name for e in cfg.engines])
        self.relay = Relay(self, self.store)

    # ----- lifecycle -----
    async def startup(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        self._clock = PacingClock(loop)
        self.drain = DrainSampler(loop, settings_from(self.cfg), self.metrics)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), timeout=aiohttp.ClientTimeout(total=None)
        )
        for ec in self.cfg.engines:
            embedded = None
            url = ec.url
            if url is None:
                from backends.sim.server import start_engine  # the simulator is only imported when embedded

                embedded = await start_engine(ec.profile, host="127.0.0.1", port=0)
                url = embedded.url
            client = EngineClient(
                ec.name, url, self._session, control_token=ec.control_token, request_timeout_s=ec.request_timeout_s
            )
            policy_name, knobs = self.cfg.policy_for(ec)
            policy = make_policy(policy_name, **knobs)
            control = ControlLoop(
                client,
                policy,
                lambda name=ec.name: (s for s in self.streams.values() if s.engine == name),
                loop.time,
                self.cfg.scheduler.tick_interval_s,
                self.metrics,
                coordinator=self.relay,  # one driver per engine across replicas
            )
            models = list(ec.models)
            if not models:
                models = await self._discover_models(client)
            handle = EngineHandle(ec, client, control, models, embedded)
            self.engines[ec.name] = handle
            for m in models:
                self._model_routes.setdefault(m, handle)
                self._model_engines.setdefault(m, []).append(handle)
            control.start()
        self.metrics.registry.register(SessionCollector(self.relay))
        self.metrics.registry.register(LatenessCollector(self._clock.lateness))  # pacing lateness histogram
        await self.store.start()
        log.info("gateway ready", extra={"engines": {n: h.client.base_url for n, h in self.engines.items()}})

    async def _discover_models(self, client: EngineClient) -> list[str]:
        deadline = self.loop_time() + 30
        while True:
            try:
                return await client.models()
            except (EngineError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                if self.loop_time() > deadline:
                    raise RuntimeError(f"engine {client.name} did not list its models: {e}") from e
                await asyncio.sleep(0.5)

    async def cleanup(self, app: web.Application) -> None:
        for h in self.engines.values():
            await self._bounded(f"control loop of {h.config.name}", h.control.stop())
        await self._bounded("session store", self.relay.close())  # flush the store, hand leases over
        for t in list(self._background):
            t.cancel()
        if self._clock is not None:
            self._clock.close()
        if self.drain is not None:
            self.drain.close()
        if self._session is not None:
            await self._bounded("HTTP client session", self._session.close())
        for h in self.engines.values():
            h.client.close()
        for h in self.engines.values():
            if h.embedded is not None:
                await self._bounded(f"embedded engine {h.config.name}", h.embedded.close())

    async def _bounded(self, what: str, step: Awaitable[Any]) -> None:
        """One shutdown step, given at most ``server.shutdown_timeout_s``: a step that hangs (a peer that never
        answers a close) is abandoned with an error naming it, and the rest of the shutdown goes on."""
        timeout = self.cfg.server.shutdown_timeout_s
        try:
            await asyncio.wait_for(step, timeout)
        except asyncio.TimeoutError:
            log.error("shutdown step did not finish in time; abandoned", extra={"step": what, "timeout_s": timeout})
        except Exception:  # noqa: BLE001 - a failing step must not keep the others from running
            log.exception("shutdown step failed", extra={"step": what})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----- routing -----
    @property
    def models(self) -> set[str]:
        return set(self._model_routes)

    def route(self, model: str) -> EngineHandle:
        h = self._model_routes.get(model)
        if h is None:  # parse_request already checked the name; this is a guard
            raise ApiError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
        candidates = self._model_engines.get(model) or [h]
        limited = any(c.config.max_streams is not None for c in candidates)
        if len(candidates) > 1 or limited:  # the healthy engine with the fewest live streams, below its limit
            load = {c.config.name: 0 for c in candidates}
            for s in self.streams.values():
                if s.engine in load:
                    load[s.engine] += 1
            open_ = [c for c in candidates if c.config.max_streams is None or load[c.config.name] < c.config.max_streams]
            if not open_:
                raise ApiError(
                    429, f"every engine serving '{model}' is at its stream limit; retry shortly", type="rate_limit_error",
                    code="engine_at_capacity", headers={"Retry-After": str(self.cfg.auth.retry_after_s)},
                )
            h = min(open_, key=lambda c: (not c.control.healthy, load[c.config.name]))
        return h

    # ----- handlers -----
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "completion")

    async def _completion(self, request: web.Request, kind: str) -> web.StreamResponse:
        last_event = request.headers.get("Last-Event-ID")
        if last_event:  # a reconnecting client: resume its stream rather than start a new generation
            return await self.relay.resume_header(request, last_event)
        arrival = self.loop_time()
        body = parse_json(await request.read())
        creq = parse_request(body, kind, request.headers, self.cfg.streams, self.models)  # type: ignore[arg-type]
        engine = self.route(creq.model)
        if len(self.streams) >= self.cfg.server.max_streams:
            self.metrics.requests.labels(kind, "rejected").inc()
            raise ApiError(
                429, "the gateway is at its stream limit; retry shortly", type="rate_limit_error", code="too_many_streams",
                headers={"Retry-After": str(self.cfg.auth.retry_after_s)},
            )
        sid = uuid.uuid4().hex[:24]
        auth.admit(request, creq, engine.config.name, sid, self.cfg.streams)  # the API key's default rate
        stream = stream_class(creq.pacing if creq.stream else "none")(
            sid,
            engine.config.name,
            creq.model,
            kind,
            creq.rate,
            creq.pacing if creq.stream else "none",
            arrival,
            creq.max_tokens,
            ChunkEncoder(kind, sid, creq.model, int(time.time())),
            self._clock,
            rate_declared=creq.rate_declared,
            include_usage=creq.include_usage,
            max_pending=self.cfg.streams.max_buffered_chunks,
            read_ahead_s=self.cfg.streams.engine_read_ahead_s,
            collect=not creq.stream,
        )
        if creq.stream:  # resumable: recorded in the session store, read from the engine by this replica
            return await self.relay.serve_new(request, stream, engine, creq.engine_body)
        upstream_body = {
            **creq.engine_body,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "vllm_xargs": {"tokenflow_id": sid},
        }
        self.streams[sid] = stream
        self.metrics.streams_active.labels(engine.config.name).inc()
        pump: asyncio.Task[None] | None = None
        try:
            try:
                upstream = await engine.client.open_stream(kind, upstream_body)
            except EngineError as e:
                self.metrics.errors.labels("engine_unavailable" if e.status >= 500 else "engine_rejected").inc()
                if e.status >= 500:
                    raise ApiError(e.status, str(e), type="server_error", code="engine_unavailable") from None
                raise ApiError(e.status, str(e), code="engine_rejected") from None
            pump = Pump(self, engine, upstream, stream).start()
            if creq.stream:
                return await self._stream_to_client(request, stream, engine)
            return await self._collect(stream, pump, creq)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            if not stream.upstream_done:
                # Client gone (or gateway error) before the engine finished: free the engine now.
                self._spawn(self._abort(engine, sid))
            del self.streams[sid]
            engine.control.policy.forget(sid)
            self.metrics.streams_active.labels(engine.config.name).dec()
            now = self.loop_time()
            self.metrics.stall_seconds.labels(engine.config.name).inc(stream.reader.stall_time_at(now))

    async def _abort(self, engine: EngineHandle, sid: str) -> None:
        try:
            await engine.client.commands([{"op": "abort", "id": sid}])
        except (EngineError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("abort failed", extra={"stream_id": sid, "engine": engine.config.name, "error": str(e)})

    async def _stream_to_client(
        self, request: web.Request, stream: Stream, engine: EngineHandle, seq: int | None = None
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**_SSE_HEADERS, "X-TokenFlow-Stream-Id": stream.id})
        writer = await resp.prepare(request)
        drain = self.drain.attach(  # measured drain: what this connection really takes (docs/drain-rate.md)
            stream, request.transport, writer, declared=stream.declared_rate if stream.rate_declared else None,
            default_rate=stream.declared_rate, owner=progress.owner_of(request),
        ) if self.drain is not None else None
        name = engine.config.name
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
                    stream.first_sent_time = self.loop_time()
                    self.metrics.ttft.labels(name).observe(stream.first_sent_time - stream.arrival_time)
                    if seq is None or seq == stream.attach_seq:  # from now on releases may go straight out
                        stream.direct = direct = direct_sender(stream, writer, request.transport, drain, seq)
                if stream.client_done:
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
            self.metrics.requests.labels(stream.kind, outcome).inc()
            delivered = stream.generated - stream.base if stream.pacing == "none" else stream.reader.consumed
            self.metrics.tokens_out.labels(name).inc(delivered)
            if self.drain is not None:
                self.drain.detach(stream, drain)
        return resp

    async def _collect(self, stream: Stream, pump: asyncio.Task[None], creq: ClientRequest) -> web.Response:
        """A non-streaming answer: not paced, returned whole when the engine finishes."""
        await pump
        if stream.error is not None:
            self.metrics.requests.labels(stream.kind, "error").inc()
            raise ApiError(502, stream.error[0], type="server_error", code=stream.error[1])
        text = "".join(stream.collected or ())
        enc = stream.encoder
        usage = usage_dict(stream.prompt_tokens, stream.generated)
        if stream.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            obj = "text_completion"
        choice.update(logprobs=None, finish_reason=stream.finish_reason)
        self.metrics.requests.labels(stream.kind, "completed").inc()
        if stream.first_token_time is not None:  # not paced: the first token is ready when it is produced
            self.metrics.ttft.labels(stream.engine).observe(stream.first_token_time - stream.arrival_time)
        self.metrics.tokens_out.labels(stream.engine).inc(stream.generated)
        return _json({"id": enc.object_id, "object": obj, "created": enc.created, "model": enc.model, "choices": [choice], "usage": usage})

    # ----- other endpoints -----
    async def list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "tokenflow", "root": m, "engine": h.config.name}
            for m, h in sorted(self._model_routes.items())
        ]
        return _json({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        engines = {n: ("up" if h.control.healthy else "down") for n, h in self.engines.items()}
        ready = bool(engines) and all(v == "up" for v in engines.values())
        session = self.relay.info()  # a degraded store still serves (from memory): ready, but say so
        status = ("degraded" if session["status"] == "degraded" else "ready") if ready else "not_ready"
        return _json({"status": status, "engines": engines, "session": session}, status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.metrics.redis_up.set(1 if self.store.kind == "redis" and not self.store.degraded else 0)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def stream_info(self, s: Stream, now: float) -> dict[str, Any]:
        return {
            "id": s.id,
            "engine": s.engine,
            "model": s.model,
            "kind": s.kind,
            "pacing": s.pacing,
            "rate": s.rate,
            "rate_declared": s.rate_declared,
            "engine_status": s.engine_status,
            "generated_tokens": s.generated,
            "consumed_tokens": s.reader.consumed if s.reader.first_token_time is not None else 0,
            "buffer_tokens": s.reader.buffer(now),
            "time_to_empty_s": round(s.reader.time_to_empty(now), 4),
            "stall_s": round(s.reader.stall_time_at(now), 4),
            "age_s": round(now - s.arrival_time, 4),
            "kv_device_tokens": s.kv_device_tokens,
            "kv_host_tokens": s.kv_host_tokens,
            "priority": s.priority,
            "preemptions": s.preemptions,
            "finished": s.upstream_done,
            **stream_fields(s, now),  # measured drain: evidence-based buffer, declared vs measured rate, stalled
        }

    async def list_streams(self, request: web.Request) -> web.Response:
        now = self.loop_time()
        return _json({"object": "list", "data": [self.stream_info(s, now) for s in self.streams.values()]})

    async def get_stream(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        s = self.streams.get(sid)
        if s is None:
            raise not_found(f"no live stream with id '{sid}'")
        return _json(self.stream_info(s, self.loop_time()))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        gw = request.app.get(GATEWAY_KEY)
        if gw is not None:
            gw.metrics.errors.labels(e.code or "invalid_request").inc()
        return e.response()
    except web.HTTPRequestEntityTooLarge as e:
        return ApiError(413, f"request body too large: {e.text}", code="body_too_large").response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return ApiError(e.status, e.reason or "error", code=str(e.status)).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return ApiError(500, "internal gateway error", type="server_error", code="internal_error").response()


def create_app(cfg: Config) -> web.Application:
    gw = Gateway(cfg)
    middlewares = [error_middleware, auth.auth_middleware(cfg.auth, gw.metrics)]  # keys, per-key limits, access log
    app = web.Application(middlewares=middlewares, client_max_size=cfg.server.max_body_bytes)
    app[GATEWAY_KEY] = gw
    app.on_startup.append(gw.startup)
    app.on_cleanup.append(gw.cleanup)
    app.router.add_post("/v1/chat/completions", gw.chat_completions)
    app.router.add_post("/v1/completions", gw.completions)
    app.router.add_get("/v1/models", gw.list_models)
    app.router.add_get("/v1/streams", gw.list_streams)
    app.router.add_get("/v1/streams/{id}", gw.get_stream)
    app.router.add_get("/v1/streams/{id}/events", gw.relay.resume_endpoint)  # resume (docs/replicas.md)
    app.router.add_post("/v1/streams/{id}/progress", progress.route(gw))
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.metrics_endpoint)
    if cfg.demo.enabled:  # the demo page and its burst control (gateway/web/), off by default
        from .web import register

        register(app, gw, cfg.demo)
    return app


@dataclass(slots=True)
class RunningGateway:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY_KEY]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_gateway(cfg: Config, host: str | None = None, port: int | None = None) -> RunningGateway:
    """Start the gateway inside the running event loop (tests, benchmarks, embedding)."""
    app = create_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=cfg.server.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.server.host, cfg.server.port if port is None else port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    h, p = sock.getsockname()[:2]
    return RunningGateway(f"http://{h}:{p}", app, runner)
