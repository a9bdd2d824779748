"""An engine's :class:`EngineView` from the policy snapshot its control loop builds each tick (pure)."""

from __future__ import annotations

from ..policy.types import EngineStatus, Snapshot
from .types import EngineView

# A running stream whose reader has more than this many seconds unread can be held for a while without a stall:
# the tokenflow policy frees its KV and batch slot when a new request needs them.
YIELD_BUFFER_S = 5.0
DEFAULT_STEP_S = 0.02
_RUNNING = (EngineStatus.RUNNING, EngineStatus.LOADING)


def view_from_snapshot(name: str, snap: Snapshot, now: float, *, up: bool = True,
                       yield_buffer_s: float = YIELD_BUFFER_S) -> EngineView:
    eng = snap.engine
    block = max(1, eng.block_size)
    step = eng.step_time_s or DEFAULT_STEP_S
    total = eng.kv_device_capacity_tokens // block
    free = max(0, eng.kv_device_capacity_tokens - eng.kv_device_used_tokens) // block
    yield_tokens = yieldable = running = waiting = queued = 0
    demand = release = 0.0
    for v in snap.streams:
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
    decode = eng.decode_tokens_per_s or (running / step if running else None)
    return EngineView(
        name=name, up=up, healthy=True, block_size=block, kv_blocks_total=total, kv_blocks_free=free,
        kv_blocks_yieldable=-(-yield_tokens // block), yieldable_streams=yieldable, queued_prefill_tokens=queued,
        waiting_requests=waiting, running_requests=running, max_num_seqs=eng.max_num_seqs, demand_tps=demand,
        decode_tps=decode, step_time_s=eng.step_time_s, prefill_tps=eng.prefill_tokens_per_s,
        kv_release_tps=release, live_streams=len(snap.streams), at=now,
    )
