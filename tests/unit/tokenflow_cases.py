"""Seeded random snapshots for the tokenflow policy and the decisions it made on them, recorded.

The recorded decisions pin the policy's behaviour while its implementation is made faster: a change that
alters any decision (or the tick's info) on any case fails ``test_policy_tokenflow_recorded``. Regenerate the
recording only for an intended change of behaviour, and say so in the commit:

    .venv/bin/python -m tests.unit.tokenflow_cases
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.policy.tokenflow import TokenFlowPolicy, _Costs, _slack_pass
from gateway.policy.types import EngineStatus, EngineView, Snapshot, StreamView

RECORDING = Path(__file__).parent / "data" / "tokenflow_decisions.json"
SEQUENCES = 160  # each a policy run over TICKS snapshots (the policy keeps its capacity estimate between ticks)
TICKS = 3
BURSTS = 80  # sequences of bursts of new requests (after the SEQUENCES)

_R, _W, _L, _H, _P = (EngineStatus.RUNNING, EngineStatus.WAITING, EngineStatus.LOADING, EngineStatus.HELD,
                      EngineStatus.PARKED)
_STATUSES = (_R, _R, _R, _H, _H, _H, _W, _W, _P, _L)  # every status, weighted roughly as under stress


def _stream(rng: random.Random, i: int, now: float, host_tier: bool) -> StreamView:
    status = rng.choice(_STATUSES)
    prompt = rng.choice((0, rng.randint(1, 64), rng.randint(64, 4096)))
    max_tokens = None if rng.random() < 0.15 else rng.randint(1, 4096)
    started = (status is not EngineStatus.WAITING and rng.random() < 0.85) or rng.random() < 0.2
    cap = max_tokens if max_tokens is not None else 8192
    gen = rng.randint(0 if not started else 1, max(1, cap)) if started else 0
    if max_tokens is not None and rng.random() < 0.1:
        gen = max(0, max_tokens - rng.randint(0, 3))  # about to finish
    ctx = prompt + gen
    on_dev = ctx if status in (EngineStatus.RUNNING, EngineStatus.PARKED) else 0
    if status is EngineStatus.LOADING:
        on_dev = rng.randint(0, ctx)
    on_host = rng.choice((0, ctx, rng.randint(0, max(1, ctx)))) if host_tier else 0
    rate = rng.choice((15.0, 20.0, 5.0, 50.0, rng.uniform(0.1, 100.0), 0.0 if rng.random() < 0.03 else 10.0))
    deep = rng.uniform(20, 90) * max(rate, 1.0)  # seconds of reading that reach the longest admission horizons
    buf = 0.0 if not started else rng.choice((0.0, rng.uniform(0, 30), rng.uniform(0, 600), rng.uniform(0, 5000), deep))
    return StreamView(
        id=f"r{i}",
        status=status,
        arrival_time=now - rng.expovariate(1 / 8),
        rate=rate,
        prompt_tokens=prompt,
        generated_tokens=gen,
        buffer_tokens=buf,
        first_token_time=(now - rng.random() * 30) if started else None,
        max_tokens=max_tokens,
        kv_device_tokens=on_dev,
        kv_host_tokens=on_host,
        priority=rng.choice((0, 0, 1)),
        preemptions=rng.randint(0, 3),
        stalled=rng.random() < 0.05,
    )


def _snapshot(rng: random.Random, now: float) -> Snapshot:
    n = rng.choice((0, 1, 2, 5, rng.randint(3, 40), rng.randint(40, 160)))
    host_tier = rng.random() < 0.6
    if rng.random() < 0.1:  # no stress: everyone runs
        streams = [replace_status(_stream(rng, i, now, host_tier), EngineStatus.RUNNING) for i in range(n)]
    else:
        streams = [_stream(rng, i, now, host_tier) for i in range(n)]
    overload = rng.random() < 0.5  # a small engine: the readers' demand exceeds what it decodes
    scale = max(1, n) * (rng.randint(100, 800) if overload else rng.randint(1500, 6000))
    step = rng.choice((None, 0.0, 0.01, 0.015, 0.04, rng.uniform(0.005, 0.2)))
    eng = EngineView(
        name="e",
        block_size=rng.choice((0, 1, 16, 16, 32)),
        max_num_seqs=rng.choice((1, 4, 16, 64, 256)),
        kv_bytes_per_token=rng.choice((0, 131072)),
        kv_device_capacity_tokens=rng.choice((0, scale, scale // 4, 10_000)),
        kv_device_used_tokens=sum(s.kv_device_tokens for s in streams),
        kv_host_capacity_tokens=rng.choice((scale * 4, scale // 2)) if host_tier else 0,
        kv_host_used_tokens=sum(s.kv_host_tokens for s in streams) if host_tier else 0,
        step_time_s=step,
        decode_tokens_per_s=None,
        prefill_tokens_per_s=rng.choice((None, 4000.0, 40000.0)),
        h2d_bytes_per_s=rng.choice((None, 5e9, 5e10)),
        d2h_bytes_per_s=rng.choice((None, 5e9, 5e10)),
    )
    return Snapshot(eng, tuple(streams), rng.choice((0.1, 0.25, 0.5)))


def _burst(rng: random.Random, now: float) -> Snapshot:
    """A burst of new requests beside started streams with buffers up to the longest admission horizon, on an
    engine whose decode capacity runs out part-way through the burst: admission's margins decide."""
    n = rng.randint(20, 150)
    host_tier = rng.random() < 0.7
    streams = []
    for i in range(n):
        s = _stream(rng, i, now, host_tier)
        s = replace(s, rate=max(s.rate, 1.0))  # (the gateway's readers always have a rate > 0)
        if rng.random() < 0.5:
            s = replace(s, status=_W, generated_tokens=0, buffer_tokens=0.0, first_token_time=None,
                        kv_device_tokens=0, kv_host_tokens=0, stalled=False)
        elif s.first_token_time is not None:
            s = replace(s, buffer_tokens=rng.uniform(0, 90) * s.rate, stalled=False)
        streams.append(s)
    eng = EngineView(
        name="e", block_size=16, max_num_seqs=256, kv_bytes_per_token=131072,
        kv_device_capacity_tokens=n * rng.randint(1500, 4000), kv_device_used_tokens=0,
        kv_host_capacity_tokens=n * 8000 if host_tier else 0, kv_host_used_tokens=0,
        step_time_s=rng.uniform(0.005, 0.08), decode_tokens_per_s=None,
        prefill_tokens_per_s=rng.choice((None, 40000.0)),
        h2d_bytes_per_s=5e10, d2h_bytes_per_s=5e10,
    )
    return Snapshot(eng, tuple(streams), 0.5)


def replace_status(s: StreamView, status: EngineStatus) -> StreamView:
    return replace(s, status=status, stalled=False)


def _knobs(rng: random.Random) -> dict[str, float]:
    if rng.random() < 0.6:
        # the defaults of the recording (first_token_grace_s was 4 s then; its default has changed since)
        return {"first_token_grace_s": 4.0}
    return {
        "conservativeness": rng.choice((1.0, 2.0, 3.0)),
        "shrink_rate": rng.choice((0.0, 0.5, 1.0)),
        "stall_budget_s": rng.choice((0.0, 0.5, 2.0)),
        "first_token_aging": rng.choice((0.5, 1.0, 2.0)),
        "first_token_grace_s": rng.choice((0.0, 4.0)),
        "overcommit": rng.choice((1.0, 8.0)),
    }


def runs() -> Iterator[tuple[int, dict[str, float], list[tuple[float, Snapshot]]]]:
    """(sequence number, knobs, [(now, snapshot) per tick]) for every recorded sequence: SEQUENCES of assorted
    snapshots, then BURSTS of bursts."""
    for seq in range(SEQUENCES + BURSTS):
        rng = random.Random(seq)
        knobs = _knobs(rng)
        now = 100.0 + rng.random() * 100
        ticks = []
        for _ in range(TICKS):
            ticks.append((now, _snapshot(rng, now) if seq < SEQUENCES else _burst(rng, now)))
            now += rng.choice((0.25, 0.5, 7.0))
        yield seq, knobs, ticks


def outcome(policy: TokenFlowPolicy, snap: Snapshot, now: float) -> dict[str, Any]:
    """What a tick decided, as JSON-able values: the decisions, the tick's info, and a digest of the slack pass over
    the snapshot (every key, footprint and sum it feeds the rest of the tick, exactly)."""
    k = policy.knobs
    t = _slack_pass(snap.streams, _Costs.of(snap, k), now, k.first_token_aging, k.first_token_grace_s)
    facts = (t.keys, t.tte, t.foot, bytes(t.kind), t.new_idx, t.order, t.n_running, t.prefilling, t.backlog,
             t.admitted, t.demand, t.beta_sum, t.dry_rate, t.dry_buf, t.end_rate, t.end_tokens)
    ds = policy.decide(snap, now)
    i = policy.info
    reasons = Counter(f"{d.op}:{d.reason}" for d in ds)
    return {
        # the decisions in order, as a digest (the recording stays small), and how many of each kind (a hint of
        # what changed when the digest does)
        "decisions": hashlib.sha256(json.dumps([[d.op, d.id, d.priority, d.reason] for d in ds]).encode()).hexdigest(),
        "reasons": dict(sorted(reasons.items())),
        "info": [i.mode, i.working_set, i.admitted, repr(i.capacity_tps), repr(i.demand_tps), i.selected],
        "slack_pass": hashlib.sha256(repr(facts).encode()).hexdigest()[:16],
    }


def record() -> list[list[dict[str, Any]]]:
    out = []
    for _, knobs, ticks in runs():
        policy = TokenFlowPolicy(**knobs)
        out.append([outcome(policy, snap, now) for now, snap in ticks])
    return out


if __name__ == "__main__":
    RECORDING.write_text(json.dumps(record(), separators=(",", ":")) + "\n")
    print(f"wrote {RECORDING}")
