"""One evaluation for the capacity planner: a workload served by N engines under one policy -> Metrics.

Placement is round-robin: arrival ``k`` (in arrival order) goes to engine ``k mod N``, and each engine is an
independent single-engine virtual-clock run (bench/virtual.py) over its share. The engines share nothing, so
N runs on one clock are N runs on their own clocks with the same arrival times; the per-request records are
then merged into one report: percentiles over all requests, throughput over the span from the first
arrival to the last token of any engine (the engines' throughputs summed over that span).

``evaluate`` is the only place the planner touches the simulator: a multi-engine run with another placement
(one virtual clock, a placement decision per arrival) replaces its body and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .metrics import RequestRecord, summarize
from .plan import Metrics
from .workload import RequestSpec, WorkloadConfig, generate

PLACEMENT = "round-robin"


@dataclass(frozen=True, slots=True)
class PlanWorkload:
    """What the engines serve and how they are simulated (the seed lives in ``evaluate``'s argument)."""

    profile: str  # configs/profiles name or path
    workload: WorkloadConfig
    tick_s: float = 0.5
    engine_preempt: str = "recompute"
    knobs: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> knob -> value


def split_round_robin(specs: list[RequestSpec], n_engines: int) -> list[list[RequestSpec]]:
    order = sorted(specs, key=lambda s: (s.arrival_s, s.id))
    return [order[i::n_engines] for i in range(n_engines)]


def evaluate(wl: PlanWorkload, n_engines: int, policy: str, seed: int) -> Metrics:
    from backends.sim.profile import load_profile

    from .virtual import run_virtual

    if n_engines < 1:
        raise ValueError("n_engines must be >= 1")
    specs = generate(wl.workload.with_(seed=seed))
    prof = load_profile(wl.profile)
    records: list[RequestRecord] = []
    preemptions = 0
    for share in split_round_robin(specs, n_engines):
        if not share:  # more engines than requests: an idle engine adds capacity, no records
            continue
        r = run_virtual(prof, share, policy, tick_s=wl.tick_s, engine_preempt=wl.engine_preempt,
                        policy_knobs=wl.knobs.get(policy))
        records.extend(r.records)
        preemptions += r.preemptions
    return metrics_of(records, n_engines, preemptions)


def metrics_of(records: list[RequestRecord], n_engines: int, preemptions: int = 0) -> Metrics:
    m: dict[str, Any] = summarize(records, preemptions=preemptions)
    return Metrics(
        requests=m["requests"],
        completed=m["completed"],
        ttft_p99_s=m["ttft_p99_s"],
        rebuffer_mean_s=m["rebuffer_mean_s"],
        rebuffer_p99_s=m["rebuffer_p99_s"],
        effective_throughput_tps=m["effective_throughput_tps"],
        throughput_tps=m["throughput_tps"],
        n_engines=n_engines,
        preemptions=preemptions,
    )
