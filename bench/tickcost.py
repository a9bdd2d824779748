"""Scheduler cost: wall time of one policy tick for N active streams (a benchmark, not a test).

The snapshot is a stressed engine, the case where the policies do real work: a quarter of the streams
running, half paused on the host with assorted buffers, the rest new and waiting. Device memory and
batch slots scale with N so the greedy fill has to choose.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import replace
from typing import Any

from gateway.policy import make_policy
from gateway.policy.types import EngineStatus, EngineView, Snapshot, StreamView


def stressed_snapshot(n: int, seed: int = 0, now: float = 100.0) -> Snapshot:
    rng = random.Random(seed)
    streams = []
    for i in range(n):
        u = rng.random()
        prompt = rng.randint(256, 1024)
        max_tokens = rng.randint(512, 4096)
        if u < 0.2:  # new, waiting
            streams.append(StreamView(f"s{i}", EngineStatus.WAITING, now - rng.random() * 5, rng.choice((15.0, 20.0)),
                                      prompt, 0, 0.0, None, max_tokens, 0, 0))
            continue
        gen = rng.randint(1, max_tokens - 1)
        status = EngineStatus.RUNNING if u < 0.45 else (EngineStatus.HELD if u < 0.95 else EngineStatus.PARKED)
        on_dev = prompt + gen if status is not EngineStatus.HELD else 0
        streams.append(StreamView(f"s{i}", status, now - 60 * rng.random(), rng.choice((15.0, 20.0)), prompt, gen,
                                  rng.random() * 300, now - 50 * rng.random(), max_tokens, on_dev, prompt + gen,
                                  0, rng.randint(0, 5)))
    eng = EngineView("bench", 16, max(8, n // 4), 131072, max(16, n // 4) * 1800,
                     sum(s.kv_device_tokens for s in streams), n * 4096, sum(s.kv_host_tokens for s in streams),
                     0.015, 6000.0, 40000.0, 5e10, 5e10)
    return Snapshot(eng, tuple(streams), 0.5)


def apply(snap: Snapshot, decisions: list[Any], dt: float) -> Snapshot:
    """The snapshot one tick later, had the engine carried out ``decisions`` (a coarse model: enough to
    put the policy in its steady state, where a tick changes a few streams, not most of them)."""
    by = {d.id: d for d in decisions if d.op != "priority"}
    prio = {d.id: d.priority for d in decisions if d.op == "priority"}
    out = []
    for s in snap.streams:
        d = by.get(s.id)
        status, dev = s.status, s.kv_device_tokens
        if d is not None:
            if d.op == "preempt":
                status, dev = EngineStatus.HELD, 0
            elif d.op in ("resume", "prefetch"):
                status, dev = EngineStatus.RUNNING, s.prompt_tokens + s.generated_tokens
        gen, buf, ftt = s.generated_tokens, s.buffer_tokens - s.rate * dt, s.first_token_time
        if status is EngineStatus.RUNNING:
            made = int(dt / 0.015)
            gen, buf, ftt = gen + made, buf + made, ftt if ftt is not None else 100.0
        out.append(replace(s, status=status, kv_device_tokens=dev, generated_tokens=gen, buffer_tokens=max(0.0, buf),
                           first_token_time=ftt, priority=prio.get(s.id, s.priority)))
    return Snapshot(snap.engine, tuple(out), snap.tick_interval_s)


def _time(policy: str, snap: Snapshot, warm: Snapshot | None, repeats: int, knobs: dict[str, Any] | None
          ) -> tuple[list[float], int]:
    times, n_dec = [], 0
    for _ in range(repeats):
        pol = make_policy(policy, **(knobs or {}))
        if warm is not None:
            pol.decide(warm, 99.5)  # the previous tick: gives the policy its state
        t0 = time.perf_counter()
        ds = pol.decide(snap, 100.0)
        times.append(time.perf_counter() - t0)
        n_dec = len(ds)
    return times, n_dec


def tick_cost(policy: str, n: int, repeats: int = 20, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median wall time of one tick: ``cold`` on a fresh stressed snapshot (most streams need a decision,
    the worst case), ``steady`` one tick after the cold decisions were carried out."""
    cold = stressed_snapshot(n)
    t_cold, d_cold = _time(policy, cold, None, repeats, knobs)
    first = make_policy(policy, **(knobs or {})).decide(cold, 100.0)
    steady = apply(cold, first, 0.5)
    t_steady, d_steady = _time(policy, steady, cold, repeats, knobs)
    return {"streams": n, "cold_median_ms": 1000 * statistics.median(t_cold), "cold_decisions": d_cold,
            "steady_median_ms": 1000 * statistics.median(t_steady), "steady_max_ms": 1000 * max(t_steady),
            "steady_decisions": d_steady}


def run(policies: list[str], sizes: list[int], repeats: int = 20) -> list[dict[str, Any]]:
    return [{"policy": p, **tick_cost(p, n, repeats if n <= 1000 else max(3, repeats // 4))}
            for p in policies for n in sizes]
