"""``tokenflow serve --workers 2``: two processes on one port, sharing state through Redis like replicas.

Both workers take connections, exactly one drives the engine (the driver lease), a stream is served whole,
and SIGTERM to the parent stops every worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from .replicas import Proc, RedisServer, free_port, poll


@pytest.fixture
def redis(tmp_path: Path):
    r = RedisServer(tmp_path)
    r.start()
    yield r
    r.stop()


def start_workers(tmp_path: Path, redis: RedisServer, engine: list[str], name: str, model: str, prefix: str,
                  **server: object) -> tuple[Proc, Proc, int]:
    """An engine (``python -m <engine> --port P``) and ``tokenflow serve --workers 2`` in front of it, sharing
    state through ``redis``; returns (engine, gateway, gateway port)."""
    up_port, port = free_port(), free_port()
    upstream = Proc(engine[0].rsplit(".", 1)[-1], [sys.executable, "-m", *engine, "--port", str(up_port)], tmp_path)
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", **server},
        "engines": [{"name": name, "url": f"http://127.0.0.1:{up_port}", "models": [model]}],
        "session": {"store": "redis", "redis_url": redis.url, "key_prefix": f"{prefix}{port}"},
    }))
    gw = Proc("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--config", str(conf), "--workers", "2"],
              tmp_path)
    return upstream, gw, port


async def test_two_workers_share_the_port_and_one_drives_the_engine(tmp_path: Path, redis: RedisServer) -> None:
    upstream, gw, port = start_workers(tmp_path, redis, ["bench.fast_upstream", "--rate", "200"], "fast", "fast", "w")
    url = f"http://127.0.0.1:{port}"
    try:
        seen: dict[str, dict[str, bool]] = {}

        async def both_workers_and_one_driver() -> bool:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                for _ in range(8):  # new connections: the kernel spreads them over the workers
                    async with http.get(url + "/readyz") as r:
                        if r.status != 200:
                            return False
                        info = (await r.json())["session"]
                        seen[info["replica"]] = info["drivers"]
            return len(seen) == 2 and sum(d.get("fast", False) for d in seen.values()) == 1

        await poll(both_workers_and_one_driver, 60, "two workers answering, one driving the engine", 0.2)

        async with aiohttp.ClientSession() as http:
            body = {"model": "fast", "prompt": "hi", "max_tokens": 30, "stream": True, "tokenflow": {"pacing": "none"}}
            async with http.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200
                raw = await r.read()
        assert raw.count(b'"finish_reason":null') == 30 and raw.endswith(b"data: [DONE]\n\n")

        gw.popen.send_signal(signal.SIGTERM)
        gw.popen.wait(20)  # the parent returns once every worker stopped
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.1)
        assert not _listening(port)
    finally:
        try:  # the parent and its workers: their own process group (start_new_session)
            os.killpg(gw.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gw.kill()
        upstream.kill()


def _listening(port: int) -> bool:
    return subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode == 0


async def test_workers_die_with_a_killed_parent(tmp_path: Path, redis: RedisServer) -> None:
    upstream, gw, port = start_workers(tmp_path, redis, ["bench.fast_upstream"], "fast", "fast", "k")
    try:
        async def up() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200

        await poll(up, 60, "workers ready", 0.2)
        gw.popen.kill()  # SIGKILL: no forwarding possible
        gw.popen.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.1)
        assert not _listening(port)  # the workers went with it
    finally:
        try:
            os.killpg(gw.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        upstream.kill()


async def test_sigterm_with_open_streams_stops_every_worker_in_bounded_time(tmp_path: Path, redis: RedisServer) -> None:
    """Open paced streams do not hold a deploy: SIGTERM ends parent and workers in about 2 x shutdown_timeout_s
    (open streams get it, then their handlers get it again), not aiohttp's 2 x 60 s or a hang in its shutdown."""
    grace = 2.0
    upstream, gw, port = start_workers(tmp_path, redis, ["backends.sim", "--profile", "sim-small"], "sim", "sim-small",
                                       "s", shutdown_timeout_s=grace)
    url = f"http://127.0.0.1:{port}"
    opened: set[int] = set()
    started: set[int] = set()
    ended: set[int] = set()

    async def stream(http: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "sim-small", "prompt": "hi", "max_tokens": 400, "stream": True, "tokenflow": {"rate": 2}}
        try:
            async with http.post(url + "/v1/completions", json=body) as r:
                if r.status == 200:
                    opened.add(i)
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        started.add(i)
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        ended.add(i)

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    tasks: list[asyncio.Task[None]] = []
    try:
        async def up() -> bool:
            async with http.get(url + "/readyz") as r:
                return r.status == 200

        await poll(up, 60, "workers ready", 0.2)
        tasks = [asyncio.create_task(stream(http, i)) for i in range(200)]

        async def all_open() -> bool:  # the engine runs 32 at a time: the policy rotates the rest in
            return len(opened) == 200 and len(started) >= 32

        await poll(all_open, 60, "200 streams open, tokens flowing", 0.1)
        assert not ended  # 400 tokens at 2/s: every stream is still open when the signal comes

        t0 = time.monotonic()
        gw.popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(gw.popen.wait, 2 * grace + 20)  # raises TimeoutExpired if the workers hang
        assert time.monotonic() - t0 < 2 * grace + 20
        assert subprocess.run(["pgrep", "-g", str(gw.popen.pid)], capture_output=True).returncode == 1  # no worker left
        assert not _listening(port)

        async def all_cut() -> bool:
            return len(ended) == 200

        await poll(all_cut, 30, "every client sees its stream end")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await http.close()
        try:
            os.killpg(gw.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gw.kill()
        upstream.kill()
