"""One evaluation for the capacity planner: a workload served by N engines under one policy -> Metrics.

The N engines run on one virtual clock (bench/cluster.py ``run_cluster``), each under its own copy of the policy,
with a placement choosing the engine of each arrival as the gateway does (default ``least-outstanding``, the
gateway's default; ``placement.strategy`` names the others). ``evaluate`` is the only place the planner touches
the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .metrics import RequestRecord, summarize
from .plan import Metrics
from .workload import WorkloadConfig, generate

DEFAULT_PLACEMENT = "least-outstanding"


@dataclass(frozen=True, slots=True)
class PlanWorkload:
    """What the engines serve and how they are simulated (the seed lives in ``evaluate``'s argument)."""

    profile: str  # configs/profiles name or path
    workload: WorkloadConfig
    tick_s: float = 0.5
    engine_preempt: str = "recompute"
    knobs: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> knob -> value
    placement: str = DEFAULT_PLACEMENT


def evaluate(wl: PlanWorkload, n_engines: int, policy: str, seed: int) -> Metrics:
    from .cluster import run_cluster

    if n_engines < 1:
        raise ValueError("n_engines must be >= 1")
    specs = generate(wl.workload.with_(seed=seed))
    r = run_cluster(specs, n_engines, wl.placement, policy, seed, profile=wl.profile, tick_s=wl.tick_s,
                    engine_preempt=wl.engine_preempt, policy_knobs=wl.knobs.get(policy))
    return metrics_of(r.records, n_engines, r.preemptions)


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
