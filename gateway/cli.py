"""``tokenflow`` command line: ``serve`` (the gateway), ``engine-sim`` (a simulated engine), ``bench``, ``plan``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .config import Config


def _serve(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="tokenflow serve", description="Run the TokenFlow gateway.")
    p.add_argument("--config", help="YAML config file (default: $TOKENFLOW_CONFIG, else built-in defaults)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="listen port (server.port)")
    p.add_argument("--policy", help="scheduling policy (scheduler.policy): fcfs, tokenflow, andes")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (SO_REUSEPORT); more than 1 needs session.store=redis "
                        "and engines with a url (docs/replicas.md)")
    p.add_argument("--demo", action="store_true",
                   help="serve the demo chat page at / (demo.enabled); without engines of your own, two embedded "
                        "simulated engines, one scheduled by tokenflow and one by fcfs")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")

    from .config import load_config

    overrides = {}
    if args.host:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.policy:
        overrides["scheduler.policy"] = args.policy
    try:
        cfg = load_config(args.config, **overrides)
        if args.demo:
            cfg = demo_config(cfg)
    except Exception as e:  # noqa: BLE001 - a bad config file is the operator's error: say what is wrong, no traceback
        print(f"tokenflow: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.workers > 1:
        problem = workers_problem(cfg)
        if problem:
            print(f"tokenflow: --workers {args.workers}: {problem}", file=sys.stderr)
            return 2
        from .workers import run_workers

        return run_workers(args.workers, lambda i: _run(cfg, worker=i, workers=args.workers))
    return _run(cfg)


def demo_config(cfg: Config) -> Config:
    """``--demo``: the demo page on; the default single embedded engine becomes the demo's two (gateway/web)."""
    from .config import Config
    from .web import DEMO_ENGINES

    update: dict[str, object] = {"demo": {**cfg.demo.model_dump(), "enabled": True}}
    if [e.model_dump() for e in cfg.engines] == [e.model_dump() for e in Config().engines]:
        update["engines"] = DEMO_ENGINES
    return Config.model_validate({**cfg.model_dump(), **update})


def workers_problem(cfg: Config) -> str | None:
    """Why this configuration cannot run as several worker processes (None: it can).

    Each worker is a replica of its own: streams, pacing and client writers are per process, and what must be
    shared (stream records for resumption, one scheduler per engine, the streams every replica holds on an
    engine) goes through the Redis session store, exactly as between replicas on several hosts.
    """
    if cfg.session.store != "redis":
        return ("several workers share stream state and one scheduler per engine through Redis: set "
                "session.store: redis (the memory store is per process)")
    if cfg.server.port == 0:
        return "server.port 0 would give each worker a port of its own: name a port"
    embedded = [e.name for e in cfg.engines if e.url is None]
    if embedded:
        return f"engines without a url ({', '.join(embedded)}) would be simulated once per worker: give each a url"
    return None


def _run(cfg: Config, worker: int | None = None, workers: int = 1) -> int:
    """Serve ``cfg`` in this process until SIGINT/SIGTERM (one worker of ``workers`` when ``worker`` is set)."""
    import uvloop

    from .app import create_app
    from .logs import setup_logging

    if worker is not None and cfg.session.replica_id:  # each worker leases streams and engines as itself
        cfg = cfg.model_copy(update={"session": cfg.session.model_copy(
            update={"replica_id": f"{cfg.session.replica_id}-w{worker}"})})
    setup_logging(cfg.server.log_level)
    url = f"http://{cfg.server.host}:{cfg.server.port}"
    embedded = [e.name for e in cfg.engines if e.url is None]

    async def _announce(app: web.Application) -> None:
        from .app import GATEWAY_KEY

        if worker:  # worker 0 speaks for all
            return

        models = sorted(app[GATEWAY_KEY].models)
        model = models[0] if models else "MODEL"
        print(f"TokenFlow gateway listening on {url}" + (f" ({workers} worker processes)" if workers > 1 else ""),
              flush=True)
        if embedded:
            print(f"  engines: embedded simulated engine ({', '.join(embedded)}) - a simulator, not a real model",
                  flush=True)
        policies = {n: h.control.policy.name for n, h in app[GATEWAY_KEY].engines.items()}
        if len(set(policies.values())) == 1:
            print(f"  policy: {next(iter(policies.values()))}; models: {', '.join(models)}", flush=True)
        else:
            print(f"  policies: {', '.join(f'{p} ({n})' for n, p in policies.items())}; "
                  f"models: {', '.join(models)}", flush=True)
        if cfg.demo.enabled:
            print(f"  demo page: {url}/", flush=True)
        print("  try:", flush=True)
        print(
            f"    curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
            f"\"stream\": true, \"max_tokens\": 40, \"tokenflow\": {{\"rate\": 10}}}}'",
            flush=True,
        )

    async def _gc(app: web.Application) -> None:  # a process-wide policy: only the serving process sets it
        from .gctune import GcTuner

        tuner = GcTuner(asyncio.get_running_loop())
        tuner.start()

        async def _stop(app: web.Application) -> None:
            tuner.close()

        app.on_cleanup.append(_stop)

    async def _bounded_exit(app: web.Application) -> None:
        # aiohttp's graceful exit, plus a backstop: a process that is still cleaning up long after its streams
        # were cut is forced out, so a deploy never waits on it (seen with several workers and Redis, rarely).
        loop = asyncio.get_running_loop()
        limit = 2 * cfg.server.shutdown_timeout_s + 5.0

        def on_signal() -> None:
            timer = threading.Timer(limit, _force_exit, args=(limit,))
            timer.daemon = True
            timer.start()
            raise web.GracefulExit()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

    async def _app() -> web.Application:  # built inside run_app's event loop
        app = await create_app(cfg)
        app.on_startup.extend((_announce, _gc, _bounded_exit))
        return app

    uvloop.install()
    # A streamed answer can last minutes: waiting for all of them would stall a deploy, so open streams get
    # server.shutdown_timeout_s, then are cut (with Redis, their clients resume on another replica).
    web.run_app(_app(), host=cfg.server.host, port=cfg.server.port, handler_cancellation=True, access_log=None,
                print=None,
                reuse_port=workers > 1, shutdown_timeout=cfg.server.shutdown_timeout_s)
    return 0


def _force_exit(limit: float) -> None:
    logging.getLogger("tokenflow.gateway").error(
        "shutdown did not finish in time; forcing exit", extra={"limit_s": limit}
    )
    logging.shutdown()
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "engine-sim", "bench", "plan"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: tokenflow {serve,engine-sim,bench,plan} [options]\n")
        print("  serve        run the gateway (default: embedded simulated engine)")
        print("  engine-sim   run a simulated engine (OpenAI API + engine control API)")
        print("  bench        benchmark scheduling policies (virtual clock or over HTTP)")
        print("  plan         engines each policy needs to meet TTFT, stall and throughput targets (virtual clock)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return _serve(rest)
    if cmd == "engine-sim":
        from backends.sim.server import main as sim_main

        return sim_main(rest) or 0
    if cmd == "plan":
        from bench.plan_cli import main as plan_main

        return plan_main(rest) or 0
    from bench.cli import main as bench_main

    return bench_main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
