"""Scheduler cost: wall time of one policy tick for N active streams (a benchmark, not a test).

The snapshot is a stressed engine, the case where the policies do real work: a quarter of the streams
running, half paused on the host with assorted buffers, the rest new and waiting. Device memory and
batch slots scale with N so the greedy fill has to choose.

Besides the policy's ``decide``, the whole control tick of that snapshot (``loop``): the gateway's
``ControlLoop.tick`` on real streams (``StreamBase`` with their reader models) and a real ``Metrics``, against an
engine stub that answers the state request with the snapshot's JSON (parsed as the engine client parses it) and
accepts every command; decisions are logged as the gateway logs them (JSON lines at info, here to /dev/null).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, cast

import orjson

from gateway.control import ControlLoop
from gateway.engines.client import EngineClient
from gateway.engines.control_api import CommandResult, EngineState
from gateway.logs import setup_logging
from gateway.metrics import Metrics
from gateway.policy import make_policy
from gateway.policy.types import EngineStatus, EngineView, Snapshot, StreamView
from gateway.streams.base import StreamBase, StreamSpec


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


class _Engine:
    """What the control loop asks of an engine client, answered from a snapshot: the state as the engine's JSON
    (parsed on every tick, as the client does), every command accepted."""

    def __init__(self, snap: Snapshot) -> None:
        self.name = snap.engine.name
        self.down = None
        self.body = orjson.dumps({"engine": asdict(snap.engine), "requests": [
            {"id": s.id, "status": s.status.value, "priority": s.priority, "prompt_tokens": s.prompt_tokens,
             "kv_device_tokens": s.kv_device_tokens, "kv_host_tokens": s.kv_host_tokens, "preemptions": s.preemptions}
            for s in snap.streams]})

    async def state(self) -> EngineState:
        return EngineState.from_json(orjson.loads(self.body))

    async def commands(self, commands: Sequence[dict[str, object]]) -> list[CommandResult]:
        reply = orjson.dumps({"results": [{"id": c["id"], "op": c["op"], "ok": True} for c in commands]})
        return [CommandResult.from_json(r) for r in orjson.loads(reply)["results"]]

    def mark_up(self) -> None:
        pass

    def fail_stalled(self, state: EngineState, now: float, stall_s: float) -> list[Any]:
        return []


def _streams(snap: Snapshot, now: float) -> list[StreamBase]:
    """The gateway's streams behind ``snap``: the same ids, rates, lengths, produced tokens and (within a token)
    buffers, from real reader models."""
    out = []
    for v in snap.streams:
        spec = StreamSpec(id=v.id, engine=snap.engine.name, model="m", kind="chat", rate=v.rate, pacing="smooth",
                          arrival_time=v.arrival_time, max_tokens=v.max_tokens)
        s = StreamBase(spec, cast(Any, None))
        if v.first_token_time is not None and v.generated_tokens > 0:
            # produced at once, read at the rate since: what is left is the buffer
            s.reader.on_tokens(v.generated_tokens, now - max(0.0, v.generated_tokens - v.buffer_tokens) / v.rate)
        s.generated = v.generated_tokens
        out.append(s)
    return out


def _time_loop(policy: str, snap: Snapshot, warm: Snapshot | None, repeats: int, knobs: dict[str, Any] | None
               ) -> list[float]:
    now = 100.0
    streams = _streams(snap, now)

    def policy_() -> Any:
        pol = make_policy(policy, **(knobs or {}))
        if warm is not None:
            pol.decide(warm, 99.5)  # the previous tick: gives the policy its state
        return pol

    async def ticks() -> list[float]:
        loop = ControlLoop(cast(EngineClient, _Engine(snap)), policy_(), lambda: streams, lambda: now,
                           snap.tick_interval_s, Metrics())
        await loop.tick()  # untimed: creates the metrics' labelled series, as every tick but the first finds them
        times = []
        for _ in range(repeats):
            loop.policy = policy_()
            t0 = time.perf_counter()
            await loop.tick()  # the stub never waits: this is the tick's CPU time
            times.append(time.perf_counter() - t0)
        return times

    return asyncio.run(ticks())


def _json_logs_to_devnull() -> tuple[logging.StreamHandler[Any], list[logging.Handler], int]:
    """The gateway's logging (gateway.logs.setup_logging: JSON lines at info), written to /dev/null."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    setup_logging("info")
    handler = cast(logging.StreamHandler[Any], root.handlers[0])
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 (closed by the caller)
    return handler, saved, level


def tick_cost(policy: str, n: int, repeats: int = 20, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median wall time of one tick: ``cold`` on a fresh stressed snapshot (most streams need a decision,
    the worst case), ``steady`` one tick after the cold decisions were carried out; ``loop``: the whole control
    tick of the steady snapshot (state parsing, snapshot building, metrics, decide, commands, decision logs)."""
    cold = stressed_snapshot(n)
    t_cold, d_cold = _time(policy, cold, None, repeats, knobs)
    first = make_policy(policy, **(knobs or {})).decide(cold, 100.0)
    steady = apply(cold, first, 0.5)
    t_steady, d_steady = _time(policy, steady, cold, repeats, knobs)
    handler, saved, level = _json_logs_to_devnull()
    try:
        t_loop = _time_loop(policy, steady, cold, repeats, knobs)
    finally:
        root = logging.getLogger()
        root.handlers[:], root.level = saved, level
        handler.stream.close()
    # the minimum too: on a shared machine it is the least disturbed estimate of the work itself
    return {"streams": n, "cold_median_ms": 1000 * statistics.median(t_cold), "cold_min_ms": 1000 * min(t_cold),
            "cold_decisions": d_cold, "steady_median_ms": 1000 * statistics.median(t_steady),
            "steady_min_ms": 1000 * min(t_steady), "steady_max_ms": 1000 * max(t_steady), "steady_decisions": d_steady,
            "loop_median_ms": 1000 * statistics.median(t_loop), "loop_min_ms": 1000 * min(t_loop)}


def run(policies: list[str], sizes: list[int], repeats: int = 20) -> list[dict[str, Any]]:
    return [{"policy": p, **tick_cost(p, n, repeats if n <= 1000 else max(3, repeats // 4))}
            for p in policies for n in sizes]
