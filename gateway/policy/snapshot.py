"""Build a policy :class:`Snapshot` from an engine's control-API state and the gateway's streams.

Shared by the gateway's control loop (wall clock) and the virtual-clock benchmark, so both feed policies
exactly the same view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .types import EngineStatus, EngineView, Snapshot, StreamView

_STATUS = {s.value: s for s in EngineStatus}


class BufferSource(Protocol):
    """What the gateway (or the bench) knows of one client stream."""

    id: str
    arrival_time: float
    max_tokens: int | None

    @property
    def rate(self) -> float: ...

    @property
    def generated_tokens(self) -> int: ...

    @property
    def first_token_time(self) -> float | None: ...

    def buffer_tokens(self, now: float) -> float: ...


def engine_view(engine: Mapping[str, Any]) -> EngineView:
    return EngineView(
        name=str(engine.get("name", "")),
        block_size=int(engine.get("block_size") or 16),
        max_num_seqs=int(engine.get("max_num_seqs") or 256),
        kv_bytes_per_token=int(engine.get("kv_bytes_per_token") or 0),
        kv_device_capacity_tokens=int(engine.get("kv_device_capacity_tokens") or 0),
        kv_device_used_tokens=int(engine.get("kv_device_used_tokens") or 0),
        kv_host_capacity_tokens=int(engine.get("kv_host_capacity_tokens") or 0),
        kv_host_used_tokens=int(engine.get("kv_host_used_tokens") or 0),
        step_time_s=_opt_float(engine.get("step_time_s")),
        decode_tokens_per_s=_opt_float(engine.get("decode_tokens_per_s")),
        prefill_tokens_per_s=_opt_float(engine.get("prefill_tokens_per_s")),
        h2d_bytes_per_s=_opt_float(engine.get("h2d_bytes_per_s")),
        d2h_bytes_per_s=_opt_float(engine.get("d2h_bytes_per_s")),
    )


def build_snapshot(
    engine_state: Mapping[str, Any],
    streams: Iterable[BufferSource],
    now: float,
    tick_interval_s: float,
) -> Snapshot:
    """Join the engine's per-request state with the gateway's buffers.

    Streams the engine does not list yet (submitted, not yet seen) count as ``waiting`` with no KV; engine
    requests that no stream owns (another client of the engine) are left out: the gateway does not drive them.
    """
    by_id: dict[str, Mapping[str, Any]] = {r["id"]: r for r in engine_state.get("requests", ())}
    views: list[StreamView] = []
    for s in streams:
        r = by_id.get(s.id)
        if r is not None:
            status = _STATUS.get(r.get("status", "waiting"), EngineStatus.WAITING)
            prompt = int(r.get("prompt_tokens") or 0)
            kv_dev = int(r.get("kv_device_tokens") or 0)
            kv_host = int(r.get("kv_host_tokens") or 0)
            prio = int(r.get("priority") or 0)
            preemptions = int(r.get("preemptions") or 0)
        else:
            status, prompt, kv_dev, kv_host, prio, preemptions = EngineStatus.WAITING, 0, 0, 0, 0, 0
        views.append(
            StreamView(
                id=s.id,
                status=status,
                arrival_time=s.arrival_time,
                rate=s.rate,
                prompt_tokens=prompt,
                generated_tokens=s.generated_tokens,
                buffer_tokens=s.buffer_tokens(now),
                first_token_time=s.first_token_time,
                max_tokens=s.max_tokens,
                kv_device_tokens=kv_dev,
                kv_host_tokens=kv_host,
                priority=prio,
                preemptions=preemptions,
                stalled=bool(getattr(s, "stalled", False)),
            )
        )
    return Snapshot(engine=engine_view(engine_state.get("engine", {})), streams=tuple(views), tick_interval_s=tick_interval_s)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
