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
from gateway.engines.control_api import CommandResult


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
        assert state.requests == {} and state.engine.name == "fast"
        assert await client.commands([{"op": "abort", "id": "x"}]) == [CommandResult(id="x", op="abort", ok=True)]
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


def test_proxy_cores_grow_with_workers_and_the_rig_gets_the_rest() -> None:
    avail = list(range(16))
    assert relay.split_cores(avail, 1) == ([0], list(range(1, 16)))
    assert relay.split_cores(avail, 4) == ([0, 1, 2, 3], list(range(4, 16)))
    assert relay.split_cores([5, 3, 4, 2], 2) == ([2, 3], [4, 5])  # sorted first
    # too few cores: the proxy gets what there is and the rig shares them all (cannot show scaling)
    assert relay.split_cores([0, 1], 2) == ([0, 1], [0, 1])
    assert relay.split_cores([0, 1], 4) == ([0, 1], [0, 1])
    assert relay.split_cores([0], 1) == ([], [])
    proxy, rig = relay.cores(1)
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(proxy) == 1 and proxy[0] not in rig


def test_streams_per_worker_scale_the_levels_and_upstreams_share_a_port() -> None:
    assert relay.case_streams([1000, 2000], 4, per_worker=True) == [4000, 8000]
    assert relay.case_streams([1000, 2000], 4, per_worker=False) == [1000, 2000]  # the cross product, as before
    assert relay.upstream_cmd(9100, 50.0, shared=False)[-4:] == ["--port", "9100", "--rate", "50.0"]
    assert relay.upstream_cmd(9100, 50.0, shared=True)[-1] == "--reuse-port"
    a = relay._parser().parse_args([])
    assert a.upstreams == 1 and not a.streams_per_worker  # defaults keep earlier results comparable
    a = relay._parser().parse_args(["--upstreams", "4", "--streams-per-worker", "--workers", "1,2,4"])
    assert a.upstreams == 4 and a.streams_per_worker and a.workers == "1,2,4"


def _case(target: str, streams: int, workers: int, delivered: float) -> relay.CaseResult:
    return relay.CaseResult(target=target, streams=streams, workers=workers, window_s=10.0,
                            offered_tps=streams * 50.0, delivered_tps=delivered, cpu_s=10.0, cpu_user_s=6.0,
                            cpu_sys_s=4.0, cpu_us_per_token=20.0, proxy_cpu_share=float(workers),
                            rig_cpu_share=1.0, ttft_p50_ms=1.0, ttft_p99_ms=2.0, proxy_cores_pinned=workers,
                            upstreams=2, redis_cpu_share=0.5, reads_per_token=0.25, writes_per_token=1.0)


def test_scaling_compares_each_worker_count_with_one_worker_at_the_same_load() -> None:
    rs = [_case("gateway-none", 2000, 1, 40_000.0), _case("gateway-none", 4000, 2, 76_000.0),
          _case("gateway-none", 8000, 4, 120_000.0), _case("gateway-smooth", 8000, 4, 1.0)]
    rows = relay.scaling(rs, per_worker=True)
    assert [(x["workers"], x["vs_one_worker"], x["efficiency"]) for x in rows] == [(1, 1.0, 1.0), (2, 1.9, 0.95),
                                                                                    (4, 3.0, 0.75)]
    assert relay.scaling(rs, per_worker=False) == [rows[0]]  # by total streams only equal loads compare
    md = relay.scaling_table(rows, True)
    assert "streams per worker" in md and "| gateway-none | 2000 | 4 | 8000 | 120,000 | 4.00 | 3.00 | 0.75 |" in md
    t = relay.table(rs)
    assert "| errors | reads / writes per token | proxy cores pinned | engines | redis cores |" in t
    assert "| 4 | 2 | 0.50 |" in t
    assert "| 0.25 / 1.00 |" in t
    assert len({line.count("|") for line in t.splitlines()}) == 1  # every row has the header's columns
    assert len({line.count("|") for line in md.splitlines()}) == 1


async def test_fast_upstreams_share_one_port() -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    first = asyncio.ensure_future(fast_upstream.serve("127.0.0.1", 0, 200.0, ready, reuse_port=True))
    port = await asyncio.wait_for(ready, 10)
    ready2: asyncio.Future[int] = loop.create_future()
    second = asyncio.ensure_future(fast_upstream.serve("127.0.0.1", port, 200.0, ready2, reuse_port=True))
    try:
        assert await asyncio.wait_for(ready2, 10) == port
    finally:
        first.cancel()
        second.cancel()


def test_start_upstreams_runs_k_processes_on_one_port(tmp_path: Path) -> None:
    ups = relay.start_upstreams(200.0, 2, [], tmp_path / "upstream.log")
    try:
        assert len(ups) == 2 and ups[0].url == ups[1].url
        assert all(u.popen.poll() is None for u in ups)
        assert all("port shared" in (tmp_path / f"upstream-{i}.log").read_text() for i in range(2))
        relay.wait_http(ups[0].url + "/v1/models", 5)
    finally:
        for u in ups:
            u.stop()


def test_tree_io_counts_this_process_reads_and_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r0, w0 = relay.tree_io(os.getpid())
    f = tmp_path / "x"
    for _ in range(5):
        f.write_bytes(b"x")
        f.read_bytes()
    r1, w1 = relay.tree_io(os.getpid())
    assert r1 - r0 >= 5 and w1 - w0 >= 5
