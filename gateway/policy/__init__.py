"""Scheduling policies. Each is pure code: (snapshot, now) -> decisions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .andes import AndesPolicy
from .fcfs import FcfsPolicy
from .knobs import AndesKnobs, TokenFlowKnobs
from .tokenflow import TokenFlowPolicy
from .types import Decision, EngineStatus, EngineView, Policy, Snapshot, StreamView

PolicyFactory = Callable[..., Policy]

_REGISTRY: dict[str, PolicyFactory] = {"fcfs": FcfsPolicy}


def register(name: str, factory: PolicyFactory) -> None:
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **knobs: Any) -> Policy:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available())}") from None
    return factory(**knobs) if knobs else factory()


register("tokenflow", TokenFlowPolicy)
register("andes", AndesPolicy)


__all__ = [
    "AndesKnobs",
    "AndesPolicy",
    "Decision",
    "EngineStatus",
    "EngineView",
    "Policy",
    "Snapshot",
    "StreamView",
    "TokenFlowKnobs",
    "TokenFlowPolicy",
    "available",
    "make_policy",
    "register",
]
