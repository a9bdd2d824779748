"""Placements that ignore the buffers: the baselines tokenflow placement is measured against."""

from __future__ import annotations

from .types import EngineView, PlacementRequest


def _open(views: list[EngineView]) -> list[EngineView]:
    return [v for v in views if v.open]


class LeastOutstanding:
    """The fewest live streams (healthy engines first): what routing did before placement, the default."""

    name = "least-outstanding"

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        cands = _open(views)
        if not cands:
            return None
        return min(cands, key=lambda v: (not v.healthy, v.live_streams)).name


class RoundRobin:
    """Each open engine in turn, whatever its load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        cands = _open(views)
        if not cands:
            return None
        v = cands[self._next % len(cands)]
        self._next += 1
        return v.name


class KvFreeFirst:
    """The most free device KV once the prompts queued there are served (ties: fewer live streams)."""

    name = "kv-free-first"

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        cands = _open(views)
        if not cands:
            return None

        def free(v: EngineView) -> float:
            if not v.informed or v.kv_blocks_total <= 0:
                return -1.0
            return (v.kv_blocks_free * v.block_size - v.queued_prefill_tokens) / (v.kv_blocks_total * v.block_size)

        return max(cands, key=lambda v: (v.healthy, free(v), -v.live_streams)).name
