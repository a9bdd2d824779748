"""HTTP mode: simulated clients through a spawned gateway (real HTTP, embedded simulated engine)."""

from __future__ import annotations

import asyncio

from bench.http import fetch_preemptions, run_clients, spawn_gateway
from bench.metrics import summarize
from bench.workload import WorkloadConfig, generate


def test_clients_record_every_token_through_a_spawned_gateway() -> None:
    specs = generate(WorkloadConfig(kind="burst", n=6, input_mean=64, output_mean=40, seed=5))
    with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.25) as url:
        recs, end = asyncio.run(run_clients(url, specs, timeout_s=120))
        pre = asyncio.run(fetch_preemptions(url))
    assert [r.error for r in recs] == [None] * 6
    assert all(r.finished for r in recs)
    assert [len(r.token_times) for r in recs] == [s.output_tokens for s in specs]
    assert all(r.token_times == sorted(r.token_times) and r.token_times[0] >= r.arrival for r in recs)
    m = summarize(recs, preemptions=pre)
    assert m["completed"] == 6 and m["tokens"] == sum(s.output_tokens for s in specs)
    assert pre is not None and pre >= 0 and end > 0
