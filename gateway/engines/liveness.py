"""Is an engine alive, and which of its streams are dead: decisions from activity and clock (pure, but for
:func:`observe`, which notes on each stream what the engine reported of its request).

The engine's liveness is judged by its control API, not by gaps between tokens. The policy holds streams on
purpose (preempted, parked, waiting behind new arrivals) for seconds or minutes, and a paced stream stops
reading its connection while it holds enough tokens, so silence on a stream says nothing by itself. The
control loop asks the engine for its state every tick; a state request that fails or is not answered within
``engines[].down_after_s`` marks the engine down (a frozen process still accepts TCP connections: its kernel
does, so only an answer proves it lives). Then:

- new requests for it fail at once (503 with Retry-After) or go to another engine of the model;
- its streams that got nothing for ``down_after_s`` end with ``EngineDown`` (:func:`silent`); one still
  receiving tokens is evidence enough that the engine serves it, and is left alone.

While the engine answers, one more case is caught: a request the engine itself reports ``running`` whose
stream the gateway is reading, that has produced before, and that sent nothing for ``stall_timeout_s``
(:func:`stalled`): a data path stuck behind a live control API. A held, parked, waiting or loading request
is never judged by its silence, and silence counts only from the last tick at which the engine reported the
request as anything but running, or reported another preemption of it (:func:`observe`): an engine short of
KV preempts and re-admits its requests by itself between ticks, and a request caught in that churn produces
nothing for a long time while the engine, not the data path, decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from .control_api import EngineStatus, RequestState


class Activity(Protocol):
    """What the liveness checks read of an open engine stream (``EngineStream`` has these)."""

    @property
    def request_id(self) -> str | None: ...

    @property
    def last_data_at(self) -> float: ...

    @property
    def reading(self) -> bool: ...

    @property
    def got_deltas(self) -> bool: ...

    # Written by :func:`observe`: the engine's preemption count of the request as last seen, and since when it
    # has been seen running without another preemption.
    engine_preemptions: int
    running_since: float


A = TypeVar("A", bound=Activity)


def silent(streams: Iterable[A], now: float, quiet_s: float) -> list[A]:
    """On an engine marked down: the streams that received nothing for ``quiet_s``."""
    return [s for s in streams if now - s.last_data_at >= quiet_s]


def observe(streams: Iterable[Activity], requests: Mapping[str, RequestState], now: float) -> None:
    """Note, per stream, the engine's view of its request at this tick: a request not running, or preempted
    again since the last tick, starts its running time (and so its silence) anew."""
    for s in streams:
        r = requests.get(s.request_id) if s.request_id is not None else None
        if r is None:
            continue
        if r.status is not EngineStatus.RUNNING or r.preemptions != s.engine_preemptions:
            s.engine_preemptions = r.preemptions
            s.running_since = now


def stalled(streams: Iterable[A], requests: Mapping[str, RequestState], now: float, stall_s: float) -> list[A]:
    """On an engine that answers: the streams of requests it reports running, read by the gateway, that
    produced before and then nothing for ``stall_s`` while the engine kept them running (see :func:`observe`,
    called first at each tick)."""
    out = []
    for s in streams:
        if not s.reading or not s.got_deltas or s.request_id is None:
            continue
        quiet_from = s.last_data_at if s.last_data_at > s.running_since else s.running_since
        if now - quiet_from < stall_s:
            continue
        r = requests.get(s.request_id)
        if r is not None and r.status is EngineStatus.RUNNING:
            out.append(s)
    return out
