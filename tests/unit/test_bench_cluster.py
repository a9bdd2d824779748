"""bench/cluster.py: several simulated engines on one virtual clock, placement choosing per arrival."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.cluster import run_cluster
from bench.workload import WorkloadConfig, generate

WL = WorkloadConfig(kind="poisson", n=60, rate_rps=20.0, input_mean=200, output_mean=120, rates=((40.0, 1.0),))


def _specs() -> list:
    # a burst on top of Poisson arrivals, long and short answers
    specs = generate(WL)
    burst = [replace(s, id=f"b-{k}", arrival_s=1.0, output_tokens=400 if k % 3 == 0 else 60)
             for k, s in enumerate(generate(WL.with_(kind="burst", n=30, seed=2)))]
    return sorted(specs + burst, key=lambda s: s.arrival_s)


@pytest.mark.parametrize("placement", ["tokenflow", "least-outstanding", "round-robin", "kv-free-first"])
def test_every_request_is_served_once_on_one_engine(placement: str) -> None:
    specs = _specs()
    r = run_cluster(specs, 3, placement, "tokenflow", 1, profile="sim-small")
    assert set(r.assignment) == {s.id for s in specs}
    assert sum(r.placed.values()) == len(specs) and set(r.placed) == {"engine-0", "engine-1", "engine-2"}
    by_id = {rec.id: rec for rec in r.records}
    for s in specs:
        rec = by_id[s.id]
        assert rec.finished and len(rec.token_times) == s.output_tokens, s.id  # every token once, none twice
        assert rec.token_times[0] >= s.arrival_s
    assert r.metrics["completed"] == len(specs) and r.metrics["requests"] == len(specs)
    if placement == "round-robin":
        assert max(r.placed.values()) - min(r.placed.values()) <= 1


def test_every_placement_serves_the_same_arrivals_and_a_config_is_generated_once_per_seed() -> None:
    runs = {p: run_cluster(WL, 2, p, "fcfs", 7, profile="sim-small") for p in ("tokenflow", "round-robin")}
    want = [(s.id, s.arrival_s, s.prompt_tokens, s.output_tokens, s.rate) for s in generate(WL.with_(seed=7))]
    for r in runs.values():
        assert [(x.id, x.arrival, x.prompt_tokens, x.max_tokens, x.rate) for x in r.records] == want
    assert runs["tokenflow"].seed == 7 and runs["round-robin"].n_engines == 2


def test_one_engine_gets_everything_and_bad_sizes_fail() -> None:
    r = run_cluster(WL.with_(n=10), 1, "least-outstanding", "tokenflow", 1, profile="sim-small")
    assert r.placed == {"engine-0": 10}
    with pytest.raises(ValueError, match="n_engines"):
        run_cluster(WL, 0, "tokenflow", "tokenflow", 1)
    with pytest.raises(ValueError, match="unknown placement"):
        run_cluster(WL, 2, "random", "tokenflow", 1, profile="sim-small")


def test_placement_bench_cases_are_identical_per_size_and_the_burst_floor_is_a_prefill_bound() -> None:
    from backends.sim.profile import load_profile
    from bench.placement import case_specs, parse, ttft_p99_floor

    args = parse(["--burst-per-engine", "50", "--rps-per-engine", "2", "--duration-s", "10", "--long-share", "0.5"])
    burst = case_specs("burst", 2, args)
    assert burst == case_specs("burst", 2, args) and len(burst) == 100
    assert {s.arrival_s for s in burst} == {0.0}
    long = sum(1 for s in burst if s.output_tokens > 1000)
    assert 30 <= long <= 70  # about half long (~2048), the rest short (~256)
    on_load = case_specs("burst-on-load", 2, args)
    assert sum(1 for s in on_load if s.arrival_s == args.burst_at_s) == 100 and len(on_load) == 140
    prompts = sorted(s.prompt_tokens for s in burst)[:99]
    assert ttft_p99_floor(burst, 1, "sim-small") == load_profile("sim-small").chunked_prefill_time(sum(prompts))
    assert ttft_p99_floor(burst, 2, "sim-small") < ttft_p99_floor(burst, 1, "sim-small")


def test_pinned_requests_go_where_they_are_pinned_and_the_uneven_case_pins_its_preload() -> None:
    from bench.placement import case_workload, parse

    specs = _specs()
    pinned = {s.id: 2 for s in specs[:20]}
    r = run_cluster(specs, 3, "round-robin", "tokenflow", 1, profile="sim-small", pinned=pinned)
    assert all(r.assignment[sid] == "engine-2" for sid in pinned)
    assert r.metrics["completed"] == len(specs)
    args = parse(["--burst-per-engine", "5", "--preload-per-engine", "4", "--burst-at-s", "10"])
    specs2, pins = case_workload("uneven", 4, args)
    assert sorted(pins.values()) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    rate = {s.id: s.rate for s in specs2}
    assert {rate[i] for i, e in pins.items() if e < 2} == {3.5}
    assert {rate[i] for i, e in pins.items() if e >= 2} == {20.0}
    assert len(specs2) == 16 + 20 and all(s.arrival_s == 10.0 for s in specs2 if s.id not in pins)
