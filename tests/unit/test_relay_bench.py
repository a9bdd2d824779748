"""The relay benchmark's parts: the fast engine speaks what the gateway needs, the accounting is right, and
``serve --workers`` refuses what it cannot run correctly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from bench import fast_upstream, relay
from gateway.cli import main as cli_main
from gateway.cli import workers_problem
from gateway.config import load_config
from gateway.engines.client import EngineClient


@pytest.fixture
async def upstream() -> str:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    task = asyncio.ensure_future(fast_upstream.serve("127.0.0.1", 0, 200.0, ready))
    port = await asyncio.wait_for(ready, 10)
    yield f"http://127.0.0.1:{port}"
    task.cancel()


async def test_fast_upstream_speaks_the_engine_api_the_gateway_reads(upstream: str) -> None:
    async with aiohttp.ClientSession() as http:
        client = EngineClient("fast", upstream, http)
        assert await client.models() == ["fast"]
        state = await client.state()  # checks X-TokenFlow-Control-Version
        assert state["requests"] == [] and state["engine"]["name"] == "fast"
        assert await client.commands([{"op": "abort", "id": "x"}]) == [{"id": "x", "op": "abort", "ok": True}]
        for kind in ("completion", "chat"):
            resp = await client.open_stream(kind, {"model": "fast", "max_tokens": 5, "stream": True})
            deltas = [d async for d in EngineClient.deltas(resp, kind)]
            resp.close()
            assert sum(d.tokens for d in deltas) == 5
            assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
            assert deltas[-1].usage == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}


async def test_fast_upstream_keeps_connections_alive_and_paces(upstream: str) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        loop = asyncio.get_running_loop()
        for _ in range(2):  # the second request reuses the connection
            t0 = loop.time()
            async with http.post(upstream + "/v1/completions", json={"max_tokens": 21}) as resp:
                body = await resp.read()
            assert body.count(b'"finish_reason":null') == 21 and body.endswith(b"data: [DONE]\n\n")
            assert loop.time() - t0 >= 20 / 200.0 * 0.9  # 20 tokens after the first, at 200 tok/s


def test_cpu_accounting_reads_proc_stat() -> None:
    u0, s0 = relay.proc_cpu(os.getpid())
    x = 0
    for i in range(2_000_000):
        x += i
    u1, s1 = relay.proc_cpu(os.getpid())
    assert u1 + s1 > u0 + s0
    assert os.getpid() in relay.tree_pids(os.getpid())
    assert relay.tree_rss(os.getpid()) > 1_000_000


def test_histogram_quantiles_and_window_delta() -> None:
    before = [(0.001, 10.0), (0.01, 10.0), (float("inf"), 10.0)]
    after = [(0.001, 10.0), (0.01, 110.0), (float("inf"), 120.0)]
    d = relay.hist_delta(before, after)
    assert d == [(0.001, 0.0), (0.01, 100.0), (float("inf"), 110.0)]
    assert relay.hist_quantile(d, 0.5) == pytest.approx(0.001 + 0.009 * 55 / 100)
    assert relay.hist_quantile(d, 0.99) == 0.01  # in the +Inf bucket: its lower bound
    assert relay.hist_quantile([], 0.5) is None
    assert relay.percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_nginx_config_is_a_plain_unbuffered_sse_proxy(tmp_path: Path) -> None:
    conf = relay.nginx_conf(tmp_path, 8080, 9100, 1)
    assert "proxy_buffering off;" in conf and "server 127.0.0.1:9100" in conf and "listen 127.0.0.1:8080" in conf
    assert 'proxy_set_header Connection "";' in conf  # keep-alive to the engine, as the gateway does


def test_workers_need_redis_engine_urls_and_a_fixed_port(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None)
    assert "redis" in (workers_problem(cfg) or "")
    cfg = load_config(None, **{"session.store": "redis"})
    assert "url" in (workers_problem(cfg) or "")  # the default embedded simulator
    assert cli_main(["serve", "--workers", "2"]) == 2
    assert "session.store: redis" in capsys.readouterr().err
