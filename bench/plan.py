"""Capacity planning: the smallest number of engines at which a policy meets every target.

Pure search over an evaluation function (``n_engines -> Metrics``): no simulation and no I/O here, so the
search is testable with a fake evaluator and the evaluation (bench/plan_eval.py) can change on its own.

The search assumes that meeting the targets is monotone in N: if N engines meet them, so do N + 1. It
doubles N from ``start`` until a run meets every target (or ``max_n`` missed), then bisects between the
last miss and the first hit. Its answer is honest whatever the truth of that assumption: the run at the
answer N met every target and the run at N - 1 missed at least one; both are rows of the result. What
monotonicity adds is that no smaller N would have met them (a target that gets harder with more engines,
such as a floor on effective throughput per engine, breaks it: docs/planning.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

Op = Literal["<=", ">="]

# Target name -> (metric it bounds, direction). Latency and stalls are ceilings, throughput floors.
TARGET_METRICS: dict[str, tuple[str, Op]] = {
    "ttft_p99_s": ("ttft_p99_s", "<="),
    "rebuffer_mean_s": ("rebuffer_mean_s", "<="),
    "rebuffer_p99_s": ("rebuffer_p99_s", "<="),
    "effective_throughput_tps": ("effective_throughput_tps", ">="),
    "effective_throughput_per_engine_tps": ("effective_throughput_per_engine_tps", ">="),
}


@dataclass(frozen=True, slots=True)
class Metrics:
    """What one evaluation at N engines measured, over all of the workload's requests."""

    requests: int
    completed: int
    ttft_p99_s: float
    rebuffer_mean_s: float
    rebuffer_p99_s: float
    effective_throughput_tps: float  # all engines together, over the run's span
    throughput_tps: float
    n_engines: int
    preemptions: int = 0

    @property
    def effective_throughput_per_engine_tps(self) -> float:
        return self.effective_throughput_tps / self.n_engines

    def value(self, name: str) -> float:
        return float(getattr(self, name))


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # a key of TARGET_METRICS
    bound: float

    @property
    def op(self) -> Op:
        return TARGET_METRICS[self.name][1]

    def met_by(self, m: Metrics) -> bool:
        v = m.value(TARGET_METRICS[self.name][0])
        if math.isnan(v):
            return False
        return v <= self.bound if self.op == "<=" else v >= self.bound

    def describe(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}"


def make_targets(bounds: dict[str, float]) -> list[Target]:
    unknown = sorted(set(bounds) - set(TARGET_METRICS))
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGET_METRICS)}")
    if not bounds:
        raise ValueError("give at least one target")
    return [Target(k, float(v)) for k, v in bounds.items()]


@dataclass(frozen=True, slots=True)
class Row:
    """One evaluated N: its metrics, each target's verdict and the wall seconds the evaluation took."""

    policy: str
    n_engines: int
    metrics: Metrics
    checks: dict[str, bool]  # target description -> met; "all requests completed" is always one
    wall_s: float
    phase: str  # "exp" (doubling) or "bisect"
    mark: str = ""  # "answer" or "answer-1" once the search is done

    @property
    def met(self) -> bool:
        return all(self.checks.values())


COMPLETED = "all requests completed"


def check(m: Metrics, targets: list[Target]) -> dict[str, bool]:
    """Each target's verdict; a run that left requests unfinished misses (its tail metrics are censored)."""
    out = {COMPLETED: m.completed == m.requests}
    for t in targets:
        out[t.describe()] = t.met_by(m)
    return out


@dataclass(slots=True)
class PolicyPlan:
    policy: str
    answer: int | None  # None: no N up to max_n met every target
    max_n: int
    rows: list[Row] = field(default_factory=list)  # in the order they were evaluated

    def row(self, n: int) -> Row | None:
        return next((r for r in self.rows if r.n_engines == n), None)

    def sorted_rows(self) -> list[Row]:
        return sorted(self.rows, key=lambda r: r.n_engines)

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "answer": self.answer,
            "max_n": self.max_n,
            "rows": [
                {
                    "n_engines": r.n_engines,
                    "met": r.met,
                    "mark": r.mark,
                    "phase": r.phase,
                    "wall_s": r.wall_s,
                    "checks": r.checks,
                    "metrics": {**asdict(r.metrics),
                                "effective_throughput_per_engine_tps": r.metrics.effective_throughput_per_engine_tps},
                }
                for r in self.sorted_rows()
            ],
        }


Evaluate = Callable[[int], Metrics]
Progress = Callable[[Row], None]


def search(policy: str, evaluate: Evaluate, targets: list[Target], *, max_n: int = 64, start: int = 1,
           progress: Progress | None = None) -> PolicyPlan:
    """The smallest N in [1, max_n] whose run meets every target, under the monotone assumption.

    Every N is evaluated at most once. On return the answer's row is marked ``answer`` and the row at
    N - 1 ``answer-1``: bisection ends with both evaluated (with ``start`` > 1 and a hit there, it bisects
    below ``start``). At N = 1 there is no N - 1 row: zero engines serve nothing.
    """
    if not 1 <= start <= max_n:
        raise ValueError(f"need 1 <= start ({start}) <= max_n ({max_n})")
    plan = PolicyPlan(policy, None, max_n)
    seen: dict[int, Row] = {}

    def run(n: int, phase: str) -> Row:
        if n not in seen:
            t0 = time.perf_counter()
            m = evaluate(n)
            row = Row(policy, n, m, check(m, targets), time.perf_counter() - t0, phase)
            seen[n] = row
            plan.rows.append(row)
            if progress is not None:
                progress(row)
        return seen[n]

    lo = 0  # the largest N known to miss: zero engines serve nothing
    n = start
    while True:
        if run(n, "exp").met:
            hi = n
            break
        lo = n
        if n >= max_n:
            return plan
        n = min(2 * n, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid, "bisect").met:
            hi = mid
        else:
            lo = mid
    plan.answer = hi
    _mark(plan, hi)
    return plan


def _mark(plan: PolicyPlan, answer: int) -> None:
    for i, r in enumerate(plan.rows):
        if r.n_engines == answer:
            plan.rows[i] = _with_mark(r, "answer")
        elif r.n_engines == answer - 1:
            plan.rows[i] = _with_mark(r, "answer-1")


def _with_mark(r: Row, mark: str) -> Row:
    return Row(r.policy, r.n_engines, r.metrics, r.checks, r.wall_s, r.phase, mark)
