"""What a placement sees of each engine and of the request it places.

A :class:`Placement` is pure, like a scheduling policy: engine views and the time in, an engine name out. The
views are built from what each engine's control loop already has (gateway/placement/views.py), published by the
engine's driver replica so every replica places with the same view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..policy.knobs import TokenFlowKnobs

# The tokenflow policy's admission horizons (gateway/policy/tokenflow.py, _HORIZONS_S) and defaults: placement
# predicts what that policy will do.
HORIZONS_S = (2.0, 8.0, 24.0, 80.0)
_KNOBS = TokenFlowKnobs()
ADMIT_UTILIZATION = _KNOBS.admit_utilization
MEMORY_TARGET = _KNOBS.memory_target
DEFAULT_STEP_S = _KNOBS.default_step_time_s
DEFAULT_PREFILL_TPS = _KNOBS.default_prefill_tokens_per_s


@dataclass(frozen=True, slots=True)
class EngineView:
    """One candidate engine, as of ``at`` (the time the view was taken, on the placing replica's clock)."""

    name: str
    up: bool = True  # answered its last heartbeat (an engine marked down is never a candidate)
    healthy: bool = True  # its control loop's last state request was answered
    informed: bool = True  # the fields below come from a recent engine state (False: only the counts are known)
    # Device KV, in blocks of ``block_size`` tokens.
    block_size: int = 16
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    # What the tokenflow policy could free at once by holding streams whose buffers hold more than a few
    # seconds (views.YIELD_BUFFER_S): their device KV and their batch slots.
    kv_blocks_yieldable: int = 0
    yieldable_streams: int = 0
    # Work ahead of a new request: prompts not prefilled yet (waiting in the engine or held by the policy).
    queued_prefill_tokens: int = 0
    waiting_requests: int = 0
    running_requests: int = 0
    max_num_seqs: int = 0
    # Tokens per second the running streams' readers need now (those without a large buffer), and what the
    # engine decodes per second with the batch that fits its device KV (the tokenflow policy's capacity).
    demand_tps: float = 0.0
    decode_tps: float | None = None
    # Per admission horizon (HORIZONS_S): decode tokens the engine makes within it (at the policy's admission
    # utilization) beyond what its streams' readers want then, less what their buffers already hold. What a
    # new request needs within the horizon must fit here for the tokenflow policy to admit it at once.
    headroom: tuple[float, ...] = ()
    step_time_s: float | None = None
    prefill_tps: float | None = None
    # Device KV freed per second as running streams finish (tokens/s): how fast a KV deficit closes.
    kv_release_tps: float = 0.0
    live_streams: int = 0
    stream_limit: int | None = None
    at: float = 0.0

    @property
    def open(self) -> bool:
        """Up and below its stream limit."""
        return self.up and (self.stream_limit is None or self.live_streams < self.stream_limit)

    def with_placed(self, request: PlacementRequest) -> EngineView:
        """This view after ``request`` was sent here and before the next view: it waits, counts, needs KV and
        takes its share of the headroom."""
        cost = request_cost(self, request)
        return replace(self, queued_prefill_tokens=self.queued_prefill_tokens + request.prompt_tokens,
                       waiting_requests=self.waiting_requests + 1, live_streams=self.live_streams + 1,
                       headroom=tuple(h - c for h, c in zip(self.headroom, cost)))

    def with_counts(self, live_streams: int, stream_limit: int | None, healthy: bool) -> EngineView:
        return replace(self, live_streams=live_streams, stream_limit=stream_limit, healthy=healthy)

    def to_json(self) -> dict[str, Any]:
        """The compact form the driver publishes (times relative: ``at`` is set by the reader)."""
        return {"n": self.name, "bs": self.block_size, "kt": self.kv_blocks_total, "kf": self.kv_blocks_free,
                "ky": self.kv_blocks_yieldable, "ys": self.yieldable_streams, "qp": self.queued_prefill_tokens,
                "wr": self.waiting_requests, "rr": self.running_requests, "ms": self.max_num_seqs,
                "dm": round(self.demand_tps, 2), "dt": None if self.decode_tps is None else round(self.decode_tps, 2),
                "hr": [round(h, 1) for h in self.headroom],
                "st": self.step_time_s, "pt": self.prefill_tps, "kr": round(self.kv_release_tps, 2),
                "ls": self.live_streams}

    @classmethod
    def from_json(cls, d: dict[str, Any], at: float) -> EngineView:
        """From :meth:`to_json` (raises KeyError, TypeError or ValueError when malformed)."""
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(name=str(d["n"]), block_size=int(d["bs"]), kv_blocks_total=int(d["kt"]),
                   kv_blocks_free=int(d["kf"]), kv_blocks_yieldable=int(d["ky"]), yieldable_streams=int(d["ys"]),
                   queued_prefill_tokens=int(d["qp"]), waiting_requests=int(d["wr"]), running_requests=int(d["rr"]),
                   max_num_seqs=int(d["ms"]), demand_tps=float(d["dm"]), decode_tps=opt(d["dt"]),
                   headroom=tuple(float(h) for h in d["hr"]),
                   step_time_s=opt(d["st"]), prefill_tps=opt(d["pt"]), kv_release_tps=float(d["kr"]),
                   live_streams=int(d["ls"]), at=at)


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    prompt_tokens: int  # estimated (the gateway counts the prompt's characters / 4 before tokenizing)
    max_tokens: int | None = None
    rate: float = 0.0  # tokens/s its reader consumes


class Placement(Protocol):
    """Chooses the engine for a new request: pure, deterministic given its inputs and its own state."""

    name: str

    def choose(self, views: list[EngineView], request: PlacementRequest, now: float) -> str | None:
        """The name of an open engine among ``views`` (None: none is open)."""


def request_cost(v: EngineView, request: PlacementRequest) -> tuple[float, ...]:
    """Decode tokens ``request`` takes from ``v`` within each horizon: what its reader wants by then (capped by
    its length) and its prompt's prefill, in the decode tokens the engine forgoes meanwhile."""
    out = float(request.max_tokens) if request.max_tokens is not None else float("inf")
    prefill = request.prompt_tokens * (v.decode_tps or 0.0) / (v.prefill_tps or DEFAULT_PREFILL_TPS)
    return tuple(min(request.rate * h, out) + prefill for h in HORIZONS_S)
