"""Tokenflow placement: the engine where a new request is predicted to get its first token soonest.

The prediction counts the buffers: KV and batch slots held by running streams whose readers have seconds of
text unread count as free, since the tokenflow policy holds such a stream the moment a new request needs room
(they read from their buffer meanwhile). What remains is the work ahead of the request there:

    ttft ~ (queued prefill tokens + prompt) / prefill tokens/s              prompts ahead, then its own
         + max(0, KV needed - free KV - yieldable KV) / KV released per s    the wait for device memory
         + max(0, busy slots + 1 - max_num_seqs) x step time x batch         the wait for a batch slot
         + decode overload x buffer horizon                                  readers the engine cannot feed

Counts cannot see any of this: an engine whose many streams hold large buffers looks busy to
least-outstanding, yet serves a new request at once.
"""

from __future__ import annotations

from .types import EngineView, PlacementRequest
from .views import DEFAULT_STEP_S, YIELD_BUFFER_S

DEFAULT_PREFILL_TPS = 10_000.0
ADMIT_UTILIZATION = 0.9  # the tokenflow policy's default share of decode capacity it promises readers
_NO_RELEASE_S = 60.0  # a KV deficit on an engine where nothing is finishing: a long wait, not forever


def predicted_ttft(v: EngineView, request: PlacementRequest) -> float:
    """Seconds until ``request`` would get its first token on ``v`` (an estimate, for ranking engines)."""
    step = v.step_time_s or DEFAULT_STEP_S
    prefill_tps = v.prefill_tps or DEFAULT_PREFILL_TPS
    ahead = v.queued_prefill_tokens + request.prompt_tokens
    t = ahead / prefill_tps + step
    room = (v.kv_blocks_free + v.kv_blocks_yieldable) * v.block_size
    deficit = ahead - room
    if deficit > 0:
        t += deficit / v.kv_release_tps if v.kv_release_tps > 0 else _NO_RELEASE_S
    if v.max_num_seqs > 0:
        busy = v.running_requests - v.yieldable_streams + v.waiting_requests + 1
        if busy > v.max_num_seqs:
            t += (busy - v.max_num_seqs) * step
    cap = v.decode_tps or 0.0
    if cap > 0:
        over = (v.demand_tps + request.rate) / (ADMIT_UTILIZATION * cap) - 1.0
        if over > 0:
            t += over * YIELD_BUFFER_S
    return t


class TokenFlowPlacement:
    name = "tokenflow"

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        cands = [v for v in views if v.open]
        if not cands:
            return None
        # Engines known only by counts (no recent state) rank after those with a prediction.
        return min(cands, key=lambda v: (not v.healthy, predicted_ttft(v, request) if v.healthy else 0.0,
                                         v.live_streams)).name
