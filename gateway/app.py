"""The gateway's aiohttp application: the wiring of services, engines, control loops and routes.

What happens to a request lives in gateway/lifecycle.py (and gateway/relay.py across replicas); its HTTP
handlers in gateway/handlers.py. This module builds them (:func:`create_app`, inside the running event loop),
starts the engines' control loops and stops everything in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import auth
from .api.errors import ApiError
from .api.responses import expect_continue, no_route
from .config import Config
from .control import ControlLoop
from .engines.client import EngineClient, EngineError
from .handlers import Handlers
from .lifecycle import RequestLifecycle
from .logs import install_protocol_error_filter
from .metrics import Metrics
from .policy import make_policy
from .relay import Relay
from .routing import EngineHandle, Engines
from .services import Services
from .state import SessionStore, make_store
from .state.metrics import SessionCollector
from .streams.base import StreamBase
from .streams.drain import DrainSampler, settings_from
from .streams.pacer import LatenessCollector, PacingClock

log = logging.getLogger("tokenflow.gateway")

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", object)  # type: ignore[arg-type]


class Gateway:
    """One gateway process's parts. Build it inside the running event loop (the pacing clock and the drain
    sampler use it); :meth:`startup` connects the engines and :meth:`cleanup` stops everything."""

    def __init__(self, cfg: Config) -> None:
        loop = asyncio.get_running_loop()
        self.cfg = cfg
        metrics = Metrics()
        self.services = svc = Services(
            cfg=cfg,
            metrics=metrics,
            store=make_store(cfg.session, [e.name for e in cfg.engines]),
            engines=Engines(cfg.placement.strategy, max_age_s=cfg.placement.max_age_s, clock=loop.time),
            streams={},
            clock=loop.time,
            pacer=PacingClock(loop),
            drain=DrainSampler(loop, settings_from(cfg), metrics),
        )
        self.requests = RequestLifecycle(svc)
        self.relay = Relay(svc, self.requests)
        self.handlers = Handlers(svc, self.requests, self.relay)
        self._session: aiohttp.ClientSession | None = None

    # The parts tests and tools look at.
    @property
    def metrics(self) -> Metrics:
        return self.services.metrics

    @property
    def store(self) -> SessionStore:
        return self.services.store

    @property
    def streams(self) -> Mapping[str, StreamBase]:
        return self.services.streams

    @property
    def engines(self) -> Engines:
        return self.services.engines

    @property
    def models(self) -> set[str]:
        return self.services.engines.models

    # ----- start and stop -----
    async def startup(self, app: web.Application) -> None:
        svc = self.services
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), timeout=aiohttp.ClientTimeout(total=None)
        )
        policies: dict[str, dict[str, object]] = {}  # what each engine is scheduled by, for the start-up log line
        for ec in self.cfg.engines:
            embedded = None
            url = ec.url
            if url is None:
                from backends.sim.server import start_engine  # the simulator is only imported when embedded

                embedded = await start_engine(ec.profile, host="127.0.0.1", port=0)
                url = embedded.url
            client = EngineClient(
                ec.name, url, self._session, control_token=ec.control_token, request_timeout_s=ec.request_timeout_s,
                connect_timeout_s=ec.connect_timeout_s, first_byte_timeout_s=ec.first_byte_timeout_s,
                state_timeout_s=ec.down_after_s,
            )
            policy_name, knobs = self.cfg.policy_for(ec)
            policy = make_policy(policy_name, **knobs)
            policies[ec.name] = {"policy": policy_name, "knobs": dict(knobs)}  # (the knobs set; the rest default)
            control = ControlLoop(
                client,
                policy,
                partial(_streams_on, svc.streams, ec.name),
                svc.clock,
                self.cfg.scheduler.tick_interval_s,
                svc.metrics,
                coordinator=self.relay,  # one driver per engine across replicas
                down_after_s=ec.down_after_s,
                stall_timeout_s=ec.stall_timeout_s,
            )
            models = list(ec.models) or await self._discover_models(client)
            svc.engines.add(EngineHandle(ec, client, control, models, embedded))
            control.start()
        for h in svc.engines.values():  # placement chooses only between engines that share a model
            h.control.placing = svc.engines.shares_a_model(h)
        svc.metrics.registry.register(SessionCollector(svc.store, self.relay.stats, lambda: list(svc.engines)))
        svc.metrics.registry.register(LatenessCollector(svc.pacer.lateness))  # pacing lateness histogram
        await svc.store.start()
        log.info("gateway ready", extra={"engines": {n: h.client.base_url for n, h in svc.engines.items()},
                                         "policies": policies})

    async def _discover_models(self, client: EngineClient) -> list[str]:
        clock = self.services.clock
        deadline = clock() + 30
        while True:
            try:
                return await client.models()
            except EngineError as e:
                if clock() > deadline:
                    raise RuntimeError(f"engine {client.name} did not list its models: {e}") from e
                await asyncio.sleep(0.5)

    async def cleanup(self, app: web.Application) -> None:
        svc = self.services
        for h in svc.engines.values():
            await self._bounded(f"control loop of {h.name}", h.control.stop())
        await self._bounded("session store", self.relay.close())  # flush the store, hand leases over
        for t in list(svc.background):
            t.cancel()
        svc.pacer.close()
        svc.drain.close()
        if self._session is not None:
            await self._bounded("HTTP client session", self._session.close())
        for h in svc.engines.values():
            h.client.close()
        for h in svc.engines.values():
            if h.embedded is not None:
                await self._bounded(f"embedded engine {h.name}", h.embedded.close())

    async def _bounded(self, what: str, step: Awaitable[Any]) -> None:
        """One shutdown step, given at most ``server.shutdown_timeout_s``: a step that hangs (a peer that never
        answers a close) is abandoned with an error naming it, and the rest of the shutdown goes on."""
        timeout = self.cfg.server.shutdown_timeout_s
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            log.error("shutdown step did not finish in time; abandoned", extra={"step": what, "timeout_s": timeout})
        except Exception:
            log.exception("shutdown step failed", extra={"step": what})


def _streams_on(streams: Mapping[str, StreamBase], engine: str) -> Iterator[StreamBase]:
    return (s for s in streams.values() if s.engine == engine)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
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
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # (a 405's methods)
        return ApiError(e.status, e.reason or "error", code=str(e.status), headers=allow).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return ApiError(500, "internal gateway error", type="server_error", code="internal_error").response()


async def create_app(cfg: Config) -> web.Application:
    """The application, built inside the running event loop."""
    gw = Gateway(cfg)
    install_protocol_error_filter()  # a malformed request is logged as one warning line, rate-limited
    middlewares: list[Middleware] = [error_middleware, auth.auth_middleware(cfg.auth, gw.metrics)]  # keys, limits, log
    app = web.Application(middlewares=middlewares, client_max_size=cfg.server.max_body_bytes)
    app[GATEWAY_KEY] = gw
    app.on_startup.append(gw.startup)
    app.on_cleanup.append(gw.cleanup)
    h = gw.handlers
    r = app.router
    x = expect_continue  # every route: an Expect header is answered before any middleware
    r.add_post("/v1/chat/completions", h.chat_completions, expect_handler=x)
    r.add_post("/v1/completions", h.completions, expect_handler=x)
    r.add_get("/v1/models", h.list_models, expect_handler=x)
    r.add_get("/v1/streams", h.list_streams, expect_handler=x)
    r.add_get("/v1/streams/{id}", h.get_stream, expect_handler=x)
    r.add_get("/v1/streams/{id}/events", h.stream_events, expect_handler=x)  # resume (docs/replicas.md)
    r.add_post("/v1/streams/{id}/progress", h.report_progress, expect_handler=x)
    r.add_get("/healthz", h.healthz, expect_handler=x)
    r.add_get("/readyz", h.readyz, expect_handler=x)
    r.add_get("/metrics", h.metrics, expect_handler=x)
    if cfg.demo.enabled:  # the demo page and its burst control (gateway/web/), off by default
        from .web import register

        register(app, gw.services, cfg.demo)
    r.add_route("*", "/{path:.*}", no_route, expect_handler=x)  # last: what nothing else serves (404, 405)
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
    app = await create_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=cfg.server.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.server.host, cfg.server.port if port is None else port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    h, p = sock.getsockname()[:2]
    return RunningGateway(f"http://{h}:{p}", app, runner)
