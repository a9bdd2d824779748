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
    eng = snap.engine
    block = max(1, eng.block_size)
    step = eng.step_time_s or DEFAULT_STEP_S
    prefill_tps = eng.prefill_tokens_per_s or DEFAULT_PREFILL_TPS
    total = eng.kv_device_capacity_tokens // block
    free = max(0, eng.kv_device_capacity_tokens - eng.kv_device_used_tokens) // block
    yield_tokens = yieldable = running = waiting = queued = 0
    demand = release = beta = 0.0
    for v in snap.streams:
        beta += v.prompt_tokens + (0.5 * v.max_tokens if v.max_tokens is not None else v.generated_tokens)
        if v.status in _RUNNING:
            running += 1
            if v.started and v.time_to_empty > yield_buffer_s:
                yieldable += 1
                yield_tokens += v.kv_device_tokens
            else:
                demand += v.rate
            rem = v.remaining_tokens
            if rem:  # it frees its KV when it finishes, about one token a step from now
                release += v.kv_device_tokens / (rem * step)
        elif not v.started:
            waiting += 1
            queued += v.prompt_tokens
    # Decode capacity as the tokenflow policy admits against: the batch that fits in device KV, one token a step.
    n = len(snap.streams)
    fit = float(eng.max_num_seqs)
    if n and eng.kv_device_capacity_tokens:
        fit = min(fit, MEMORY_TARGET * eng.kv_device_capacity_tokens / max(beta / n, 1.0))
    cap = max(fit, 1.0) / step
    # What the readers want within each horizon beyond their buffers (capped by what each still has to
    # produce); a request not started yet wants its first h seconds and its prompt's prefill.
    need = [0.0] * len(HORIZONS_S)
    for v in snap.streams:
        left = float(v.max_tokens - v.generated_tokens) if v.max_tokens is not None else float("inf")
        if v.started:
            for x, h in enumerate(HORIZONS_S):
                w = v.rate * h - v.buffer_tokens
                if w > 0:
                    need[x] += w if w < left else left
        else:
            pf = v.prompt_tokens * cap / prefill_tps
            for x, h in enumerate(HORIZONS_S):
                w = v.rate * h
                need[x] += (w if w < left else left) + pf
    headroom = tuple(ADMIT_UTILIZATION * cap * h - need[x] for x, h in enumerate(HORIZONS_S))
    return EngineView(
        name=name, up=up, healthy=True, block_size=block, kv_blocks_total=total, kv_blocks_free=free,
        kv_blocks_yieldable=-(-yield_tokens // block), yieldable_streams=yieldable, queued_prefill_tokens=queued,
        waiting_requests=waiting, running_requests=running, max_num_seqs=eng.max_num_seqs, demand_tps=demand,
        decode_tps=cap, headroom=headroom, step_time_s=eng.step_time_s, prefill_tps=eng.prefill_tokens_per_s,
        kv_release_tps=release, live_streams=n, at=now,
    )
