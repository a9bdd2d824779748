"""Placement: which engine serves a new request. Pure code: engine views and the time in, a name out."""

from __future__ import annotations

from collections.abc import Callable

from .baselines import KvFreeFirst, LeastOutstanding, RoundRobin
from .tokenflow import TokenFlowPlacement, predicted_ttft
from .types import EngineView, Placement, PlacementRequest
from .views import YIELD_BUFFER_S, view_from_snapshot

DEFAULT = "least-outstanding"

_REGISTRY: dict[str, Callable[[], Placement]] = {
    "tokenflow": TokenFlowPlacement,
    "least-outstanding": LeastOutstanding,
    "round-robin": RoundRobin,
    "kv-free-first": KvFreeFirst,
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def make_placement(name: str) -> Placement:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown placement {name!r}; available: {', '.join(available())}") from None


__all__ = [
    "DEFAULT",
    "YIELD_BUFFER_S",
    "EngineView",
    "KvFreeFirst",
    "LeastOutstanding",
    "Placement",
    "PlacementRequest",
    "RoundRobin",
    "TokenFlowPlacement",
    "available",
    "make_placement",
    "predicted_ttft",
    "view_from_snapshot",
]
