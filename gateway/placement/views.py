"""An engine's :class:`EngineView` from the policy snapshot its control loop builds each tick (pure)."""

from __future__ import annotations

from ..policy.types import EngineStatus, Snapshot
from .types import ADMIT_UTILIZATION, DEFAULT_PREFILL_TPS, DEFAULT_STEP_S, HORIZONS_S, MEMORY_TARGET, EngineView

# A running stream whose reader has more than this many seconds unread can be held for a while without a stall:
# the tokenflow policy frees its KV and batch slot when a new request needs them.
YIELD_BUFFER_S = 5.0
_RUNNING = (EngineStatus.RUNNING, EngineStatus.LOADING)


def view_from_snapshot(name: str, snap: Snapshot, now: float, *, up: bool = True,
                       yield_buffer_s: float = YIELD_BUFFER_S) -> EngineView:
    """One pass over the streams (every control tick, beside the policy: locals only, horizons unrolled)."""
    eng = snap.engine
    block = max(1, eng.block_size)
    step = eng.step_time_s or DEFAULT_STEP_S
    prefill_tps = eng.prefill_tokens_per_s or DEFAULT_PREFILL_TPS
    total = eng.kv_device_capacity_tokens // block
    free = max(0, eng.kv_device_capacity_tokens - eng.kv_device_used_tokens) // block
    yield_tokens = yieldable = running = waiting = queued = 0
    demand = release = beta = 0.0
    # What the readers want within each horizon beyond their buffers, capped by what each still has to
    # produce; a request not started yet wants its first h seconds (and its prompt's prefill, added below).
    h0, h1, h2, h3 = HORIZONS_S
    n0 = n1 = n2 = n3 = 0.0
    inf = float("inf")
    for v in snap.streams:
        mt, gen, r = v.max_tokens, v.generated_tokens, v.rate
        if mt is None:
            beta += v.prompt_tokens + gen
            left = inf
        else:
            beta += v.prompt_tokens + 0.5 * mt
            left = float(mt - gen)
        started = v.first_token_time is not None
        if started:
            b = v.buffer_tokens
            w = r * h0 - b
            if w > 0:
                n0 += w if w < left else left
                w = r * h1 - b
                n1 += w if w < left else left
                w = r * h2 - b
                n2 += w if w < left else left
                w = r * h3 - b
                n3 += w if w < left else left
            else:
                w = r * h1 - b
                if w > 0:
                    n1 += w if w < left else left
                w = r * h2 - b
                if w > 0:
                    n2 += w if w < left else left
                w = r * h3 - b
                if w > 0:
                    n3 += w if w < left else left
        else:
            w = r * h0
            n0 += w if w < left else left
            w = r * h1
            n1 += w if w < left else left
            w = r * h2
            n2 += w if w < left else left
            w = r * h3
            n3 += w if w < left else left
        if v.status in _RUNNING:
            running += 1
            if started and (r <= 0 or v.buffer_tokens > yield_buffer_s * r):
                yieldable += 1
                yield_tokens += v.kv_device_tokens
            else:
                demand += r
            if mt is not None and left > 0:  # it frees its KV when it finishes, about one token a step from now
                release += v.kv_device_tokens / (left * step)
        elif not started:
            waiting += 1
            queued += v.prompt_tokens
    # Decode capacity as the tokenflow policy admits against: the batch that fits in device KV, one token a step.
    n = len(snap.streams)
    fit = float(eng.max_num_seqs)
    if n and eng.kv_device_capacity_tokens:
        fit = min(fit, MEMORY_TARGET * eng.kv_device_capacity_tokens / max(beta / n, 1.0))
    cap = max(fit, 1.0) / step
    # Prompts of requests with no token yet, in the decode tokens the engine forgoes computing them.
    pf = sum(v.prompt_tokens for v in snap.streams if v.first_token_time is None)
    pf_cost = pf * cap / prefill_tps
    u = ADMIT_UTILIZATION * cap
    headroom = (u * h0 - n0 - pf_cost, u * h1 - n1 - pf_cost, u * h2 - n2 - pf_cost, u * h3 - n3 - pf_cost)
    return EngineView(
        name=name, up=up, healthy=True, block_size=block, kv_blocks_total=total, kv_blocks_free=free,
        kv_blocks_yieldable=-(-yield_tokens // block), yieldable_streams=yieldable, queued_prefill_tokens=queued,
        waiting_requests=waiting, running_requests=running, max_num_seqs=eng.max_num_seqs, demand_tps=demand,
        decode_tps=cap, headroom=headroom, step_time_s=eng.step_time_s, prefill_tps=eng.prefill_tokens_per_s,
        kv_release_tps=release, live_streams=n, at=now,
    )
