"""The docker-compose topology as local processes: client -> nginx (shipped config) -> 2 gateways -> 2 sim engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.deploy.topology import CONTROL_TOKEN, Topology, start_topology

TOKENS = 20
RATE = 10.0  # tokens/s: the answer takes ~1.9 s to deliver


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    topo = start_topology(tmp_path_factory.mktemp("topology"))
    try:
        yield topo
    finally:
        topo.stop()


def model_of(topo: Topology) -> str:
    import json

    return json.loads(topo.service("gateway-1")["environment"]["TOKENFLOW_ENGINES"])[0]["models"][0]


async def stream_arrivals(http: aiohttp.ClientSession, url: str, model: str) -> tuple[list[float], list[str], dict]:
    """Send one paced streaming chat request; return each token's arrival time, the tokens and the headers."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": TOKENS,
            "tokenflow": {"rate": RATE}}
    t0 = time.monotonic()
    arrivals, tokens = [], []
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        headers = dict(resp.headers)
        async for line in resp.content:
            if line.startswith(b"data: {"):
                delta = orjson.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    arrivals.append(time.monotonic() - t0)
                    tokens.append(delta)
    return arrivals, tokens, headers


def incremental(arrivals: list[float]) -> bool:
    """Tokens reached the client spread over the pacing time, the first long before the last."""
    span = arrivals[-1] - arrivals[0]
    return span > 0.6 * (TOKENS - 1) / RATE and arrivals[0] < arrivals[-1] / 2


async def test_a_stream_through_the_load_balancer_arrives_token_by_token(topology):
    async with aiohttp.ClientSession() as http:
        arrivals, tokens, headers = await stream_arrivals(http, topology.lb_url, model_of(topology))
    assert "".join(tokens).split() == [f"tok{i}" for i in range(TOKENS)]
    assert headers["Content-Type"].startswith("text/event-stream") and headers.get("X-TokenFlow-Stream-Id")
    assert incremental(arrivals), arrivals


async def test_streams_spread_over_both_gateways_and_both_engines(topology):
    model = model_of(topology)
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(stream_arrivals(http, topology.lb_url, model) for _ in range(6)))
        assert all(len(tokens) == TOKENS for _, tokens, _ in results)
        served_by_gateway: dict[str, float] = {}
        served_by_engine: dict[str, float] = {}
        for gw in ("gateway-1", "gateway-2"):
            async with http.get(topology.procs[gw].url + "/metrics") as r:
                text = await r.text()
            for line in text.splitlines():
                if line.startswith("tokenflow_tokens_in_total{"):
                    engine = line.split('engine="', 1)[1].split('"', 1)[0]
                    value = float(line.rsplit(" ", 1)[1])
                    served_by_gateway[gw] = served_by_gateway.get(gw, 0) + value
                    served_by_engine[engine] = served_by_engine.get(engine, 0) + value
    assert served_by_gateway.get("gateway-1", 0) > 0 and served_by_gateway.get("gateway-2", 0) > 0, served_by_gateway
    assert served_by_engine.get("engine-1", 0) > 0 and served_by_engine.get("engine-2", 0) > 0, served_by_engine


async def test_engine_control_apis_require_the_shared_token(topology):
    async with aiohttp.ClientSession() as http:
        for engine in ("sim-1", "sim-2"):
            url = topology.procs[engine].url + "/control/v1/state"
            async with http.get(url) as r:
                assert r.status == 401
            async with http.get(url, headers={"Authorization": f"Bearer {CONTROL_TOKEN}"}) as r:
                assert r.status == 200
        # The gateways hold that token (from the compose environment): both report both engines up.
        for gw in ("gateway-1", "gateway-2"):
            async with http.get(topology.procs[gw].url + "/readyz") as r:
                assert r.status == 200 and (await r.json())["engines"] == {"engine-1": "up", "engine-2": "up"}


async def test_the_replicas_share_redis_and_one_drives_each_engine(topology):
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:
            sessions = {}
            for gw in ("gateway-1", "gateway-2"):
                async with http.get(topology.procs[gw].url + "/readyz") as r:
                    sessions[gw] = (await r.json())["session"]
            drivers = {e: [gw for gw, s in sessions.items() if s["drivers"].get(e)] for e in ("engine-1", "engine-2")}
            if all(len(d) == 1 for d in drivers.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    for gw, s in sessions.items():
        assert (s["store"], s["status"], s["replica"]) == ("redis", "ok", gw), s
    assert all(len(d) == 1 for d in drivers.values()), drivers


async def test_gateway_processes_log_json_lines_with_stream_and_engine(topology):
    async with aiohttp.ClientSession() as http:
        _, _, headers = await stream_arrivals(http, topology.lb_url, model_of(topology))
    sid = headers["X-TokenFlow-Stream-Id"]
    deadline = time.monotonic() + 10
    found = None
    while found is None and time.monotonic() < deadline:
        for gw in ("gateway-1", "gateway-2"):
            for line in topology.procs[gw].log.read_text().splitlines():
                if not line.startswith("{"):
                    continue  # the start-up banner is plain text on stdout
                rec = orjson.loads(line)  # every log line is one JSON object
                assert {"ts", "level", "logger", "msg"} <= rec.keys()
                if rec.get("stream_id") == sid and rec["msg"] == "request":
                    found = rec
        if found is None:
            await asyncio.sleep(0.1)
    assert found is not None, f"no access log line for stream {sid}"
    assert found["engine"] in ("engine-1", "engine-2") and found["status"] == 200 and found["level"] == "info"
    for gw in ("gateway-1", "gateway-2"):
        assert CONTROL_TOKEN not in topology.procs[gw].log.read_text()


async def test_the_streaming_check_detects_a_buffering_load_balancer(tmp_path: Path, topology):
    """Negative control: the same topology with proxy buffering switched on delivers in bursts."""
    buffered = start_topology(tmp_path, lb_buffered=True)
    try:
        async with aiohttp.ClientSession() as http:
            arrivals, tokens, _ = await stream_arrivals(http, buffered.lb_url, model_of(buffered))
        assert len(tokens) == TOKENS
        assert not incremental(arrivals), arrivals
    finally:
        buffered.stop()
