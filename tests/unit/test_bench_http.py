"""HTTP mode: simulated clients through a spawned gateway (real HTTP, embedded simulated engine)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from bench.http import fetch_engine_preemptions, fetch_policy_preempts, run_clients, spawn_gateway
from bench.metrics import RequestRecord, summarize
from bench.workload import WorkloadConfig, generate
from tests.support.procs import Proc, free_port, poll


def test_clients_record_every_token_through_a_spawned_gateway() -> None:
    specs = generate(WorkloadConfig(kind="burst", n=6, input_mean=64, output_mean=40, seed=5))
    with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.25) as url:
        recs, end = asyncio.run(run_clients(url, specs, timeout_s=120))
        pre = asyncio.run(fetch_policy_preempts(url))
    assert [r.error for r in recs] == [None] * 6
    assert all(r.finished for r in recs)
    assert [len(r.token_times) for r in recs] == [s.output_tokens for s in specs]
    assert all(r.token_times == sorted(r.token_times) and r.token_times[0] >= r.arrival for r in recs)
    m = summarize(recs, preemptions=pre)
    assert m["completed"] == 6 and m["tokens"] == sum(s.output_tokens for s in specs)
    assert pre is not None and pre >= 0 and end > 0


def test_a_kept_gateway_log_holds_every_decision_the_gateway_counted(tmp_path: Path) -> None:
    # What the GPU burst keeps beside each run's report, to compare two runs' schedules decision by decision.
    specs = generate(WorkloadConfig(kind="burst", n=40, input_mean=512, output_mean=200, seed=1))
    log_path = tmp_path / "runs" / "gateway-tokenflow.log"  # (its folder is made for it)
    with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.25, log_path=log_path, log_level="info") as url:
        recs, _ = asyncio.run(run_clients(url, specs, timeout_s=120))
        pre = asyncio.run(fetch_policy_preempts(url))
        engine_pre = asyncio.run(fetch_engine_preemptions(url))
    assert all(r.finished for r in recs)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    decisions = [x for x in lines if x["msg"] == "decision"]
    assert pre, "the burst should make the policy preempt"
    preempts = [x for x in decisions if x["decision"] == "preempt"]
    assert len(preempts) == pre
    # (a command the engine refused, say for a stream that ended meanwhile, is there too, with ok false)
    assert all(x["reason"] and x["stream_id"] and x["ts"] > 0 and isinstance(x["ok"], bool) for x in preempts)
    # The engine counted every preemption it accepted (and any of its own), as the gateway mirrors it. Not every
    # decision: one for a stream the engine had just finished comes back not_found, and counts as a decision only.
    assert engine_pre is not None and engine_pre >= sum(x["ok"] for x in preempts)
    assert {x["stream_id"] for x in decisions} <= {r.stream_id for r in recs}


async def test_a_stream_the_gateway_ends_with_an_error_event_is_recorded_as_failed() -> None:
    """A report must say why requests did not complete: an SSE error event (engine down, stalled) is the
    request's error, not a silent unfinished stream."""
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'id: s:1\ndata: {"choices":[{"text":"a","index":0,"finish_reason":null}]}\n\n')
        await resp.write(b'data: {"error":{"message":"stalled","type":"server_error","param":null,'
                         b'"code":"engine_stalled"}}\n\n')
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        specs = generate(WorkloadConfig(kind="burst", n=2, input_mean=8, output_mean=4, seed=1))
        recs, _ = await run_clients(f"http://127.0.0.1:{port}", specs, timeout_s=30)
    finally:
        await runner.cleanup()
    assert [len(r.token_times) for r in recs] == [1, 1]
    assert not any(r.finished for r in recs)
    assert all(r.error is not None and "engine_stalled" in r.error for r in recs)


def test_a_burst_whose_engine_dies_ends_at_once_with_every_request_failed(tmp_path: Path) -> None:
    """The spawned gateway writes a log line for every stream its dead engine ended, hundreds in a burst: that must
    never block it (it did: its log went to a pipe nobody read until it exited, the gateway stopped at the first
    line past the pipe's buffer, and the run hung until its requests timed out)."""
    port = free_port()
    engine = Proc("engine", [sys.executable, "-m", "backends.sim", "--profile", "sim-small", "--port", str(port)],
                  tmp_path, url=f"http://127.0.0.1:{port}")
    specs = generate(WorkloadConfig(kind="burst", n=200, input_mean=64, output_mean=4000, seed=3))
    tokens = 0

    def on_token(n: int) -> None:
        nonlocal tokens
        tokens += n

    async def streaming() -> bool:
        return tokens >= 200

    async def burst(url: str) -> list[RequestRecord]:
        run = asyncio.create_task(run_clients(url, specs, on_token=on_token, timeout_s=600))
        await poll(streaming, 60, "the burst streaming")
        engine.kill(signal.SIGKILL)
        recs, _ = await asyncio.wait_for(run, 60)
        assert await fetch_policy_preempts(url) is not None  # the gateway still answers
        return recs

    try:
        engine.wait_http("/health")
        with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.25,
                           engines=[{"name": "e", "url": engine.url, "models": ["sim-small"], "down_after_s": 1.0}],
                           ) as url:  # fmt: skip
            recs = asyncio.run(burst(url))
    finally:
        engine.stop()
    assert not any(r.finished for r in recs)
    assert all(r.error is not None for r in recs), [r.error for r in recs if r.error is None][:3]
