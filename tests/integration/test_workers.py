"""``tokenflow serve --workers 2``: two processes on one port, sharing state through Redis like replicas.

Both workers take connections, exactly one drives the engine (the driver lease), a stream is served whole,
and SIGTERM to the parent stops every worker.
"""

from __future__ import annotations

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


async def test_two_workers_share_the_port_and_one_drives_the_engine(tmp_path: Path, redis: RedisServer) -> None:
    up_port, port = free_port(), free_port()
    upstream = Proc("upstream", [sys.executable, "-m", "bench.fast_upstream", "--port", str(up_port), "--rate", "200"],
                    None, tmp_path)
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "engines": [{"name": "fast", "url": f"http://127.0.0.1:{up_port}", "models": ["fast"]}],
        "session": {"store": "redis", "redis_url": redis.url, "key_prefix": f"w{port}"},
    }))
    gw = Proc("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--config", str(conf), "--workers", "2"],
              None, tmp_path)
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

        gw.p.send_signal(signal.SIGTERM)
        gw.p.wait(20)  # the parent returns once every worker stopped
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.1)
        assert not _listening(port)
    finally:
        try:  # the parent and its workers: their own process group (start_new_session)
            os.killpg(gw.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        gw.kill()
        upstream.kill()


def _listening(port: int) -> bool:
    return subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode == 0


async def test_workers_die_with_a_killed_parent(tmp_path: Path, redis: RedisServer) -> None:
    up_port, port = free_port(), free_port()
    upstream = Proc("upstream", [sys.executable, "-m", "bench.fast_upstream", "--port", str(up_port)], None, tmp_path)
    conf = tmp_path / "gateway.yaml"
    conf.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "engines": [{"name": "fast", "url": f"http://127.0.0.1:{up_port}", "models": ["fast"]}],
        "session": {"store": "redis", "redis_url": redis.url, "key_prefix": f"k{port}"},
    }))
    gw = Proc("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--config", str(conf), "--workers", "2"],
              None, tmp_path)
    try:
        async def up() -> bool:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200

        await poll(up, 60, "workers ready", 0.2)
        gw.p.kill()  # SIGKILL: no forwarding possible
        gw.p.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.1)
        assert not _listening(port)  # the workers went with it
    finally:
        try:
            os.killpg(gw.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        upstream.kill()
