"""Tokenflow placement: the engine where a new request is predicted to get its first token soonest.

Under the tokenflow policy a new request starts once the engine can feed it without starving the readers it
already serves; their buffers count: a reader with seconds of text unread wants nothing from the engine for
those seconds, so its KV and batch slot can be lent to the newcomer. The view's ``headroom`` is that check,
done ahead per horizon h (2, 8, 24, 80 s) as the policy does it: decode tokens the engine makes within h,
less what its readers want within h beyond their buffers, less what the requests queued there want. Then

    ttft ~ (queued prefill tokens + prompt) / prefill tokens/s                 prompts ahead, then its own
         + max over h of max(0, cost(h) - headroom(h)) / decode tokens/s       the wait for decode capacity
         + max(0, KV needed - free KV - yieldable KV) / KV released per s       the wait for device memory

and among engines that fit it at once, the one with the most headroom left (the least loaded by what its
readers need, not by how many they are). Counts see none of this: an engine whose many streams hold deep
buffers looks busy to least-outstanding, yet starts a new request at once.
"""

from __future__ import annotations

from .types import DEFAULT_PREFILL_TPS, DEFAULT_STEP_S, HORIZONS_S, EngineView, PlacementRequest, request_cost

_NO_RELEASE_S = 60.0  # a KV deficit on an engine where nothing is finishing: a long wait, not forever


def predicted_ttft(v: EngineView, request: PlacementRequest) -> float:
    """Seconds until ``request`` would get its first token on ``v`` (an estimate, for ranking engines)."""
    step = v.step_time_s or DEFAULT_STEP_S
    ahead = v.queued_prefill_tokens + request.prompt_tokens
    t = ahead / (v.prefill_tps or DEFAULT_PREFILL_TPS) + step
    cap = v.decode_tps or 0.0
    if cap > 0 and v.headroom:
        deficit = max(c - h for c, h in zip(request_cost(v, request), v.headroom))
        if deficit > 0:
            t += deficit / cap
    room = (v.kv_blocks_free + v.kv_blocks_yieldable) * v.block_size
    if ahead > room:
        t += (ahead - room) / v.kv_release_tps if v.kv_release_tps > 0 else _NO_RELEASE_S
    return t


def spare_share(v: EngineView, request: PlacementRequest) -> float:
    """The smallest share of a horizon's capacity left once ``request`` is there (more: less loaded)."""
    cap = v.decode_tps or 0.0
    if cap <= 0 or not v.headroom:
        return 0.0
    return min((h - c) / (cap * hs) for h, c, hs in zip(v.headroom, request_cost(v, request), HORIZONS_S))


class TokenFlowPlacement:
    name = "tokenflow"

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        cands = [v for v in views if v.open]
        if not cands:
            return None
        known = [v for v in cands if v.informed]
        if not known:  # no engine state anywhere: counts are all there is
            return min(cands, key=lambda v: v.live_streams).name
        # Round the prediction to a step so that engines which all start it at once compare by headroom.
        return min(known, key=lambda v: (round(predicted_ttft(v, request) / (v.step_time_s or DEFAULT_STEP_S)),
                                         -spare_share(v, request), v.live_streams)).name
