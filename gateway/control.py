"""The control loop: every tick, per engine, snapshot -> policy -> decisions -> engine.

It never blocks the data path: a slow or dead engine control API only delays this engine's next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .engines.client import EngineClient, EngineError
from .metrics import Metrics
from .policy.snapshot import BufferSource, build_snapshot
from .policy.types import Decision, Policy
from .streams.stream import Stream

log = logging.getLogger("tokenflow.control")


class Coordinator(Protocol):
    """Several replicas: whether this one drives the engine, and every replica's streams on it."""

    def is_driver(self, engine: str) -> bool: ...

    def streams_for(self, engine: str, local: list[Stream], now: float) -> list[BufferSource]: ...


class ControlLoop:
    def __init__(
        self,
        engine: EngineClient,
        policy: Policy,
        streams: Callable[[], Iterable[Stream]],
        clock: Callable[[], float],
        tick_interval_s: float,
        metrics: Metrics,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self._streams = streams
        self._clock = clock
        self.tick_interval_s = tick_interval_s
        self.metrics = metrics
        self.last_state: dict[str, Any] | None = None
        self.healthy = False
        self.ticks = 0
        self.coordinator = coordinator
        self.driving = coordinator is None  # this replica runs the policy for the engine
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"control-{self.engine.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        next_at = self._clock()
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one tick must not stop scheduling for good
                log.exception("control tick failed", extra={"engine": self.engine.name})
                self.metrics.errors.labels("control_tick").inc()
            next_at += self.tick_interval_s
            now = self._clock()
            if next_at < now:  # fell behind: skip missed ticks rather than burst
                next_at = now + self.tick_interval_s
            await asyncio.sleep(next_at - now)

    async def tick(self) -> list[Decision]:
        name = self.engine.name
        try:
            state = await self.engine.state()
        except (EngineError, OSError, asyncio.TimeoutError) as e:
            if self.healthy:
                log.warning("engine control API unavailable", extra={"engine": name, "error": str(e)})
            self.healthy = False
            self.metrics.engine_up.labels(name).set(0)
            return []
        self.healthy = True
        self.last_state = state
        self.ticks += 1
        m = self.metrics
        m.engine_up.labels(name).set(1)
        eng = state.get("engine", {})
        if eng.get("kv_device_capacity_tokens"):
            m.engine_kv_device.labels(name).set(eng.get("kv_device_used_tokens", 0) / eng["kv_device_capacity_tokens"])
        if eng.get("kv_host_capacity_tokens"):
            m.engine_kv_host.labels(name).set(eng.get("kv_host_used_tokens", 0) / eng["kv_host_capacity_tokens"])
        m.engine_counters.update(name, eng.get("counters") or {})

        now = self._clock()
        streams = [s for s in self._streams() if not s.upstream_done]
        self._record_engine_view(state, streams)
        sources: list[BufferSource] = list(streams)
        if self.coordinator is not None:
            self.driving = self.coordinator.is_driver(name)
            if not self.driving:
                return []  # another replica schedules this engine (it sees our streams' published state)
            sources = self.coordinator.streams_for(name, streams, now)
        snap = build_snapshot(state, sources, now, self.tick_interval_s)
        buffer_hist, tte_hist = m.buffer.labels(name), m.time_to_empty.labels(name)  # one label lookup per tick
        for v in snap.streams:
            buffer_hist.observe(v.buffer_tokens)
            if v.started:
                tte_hist.observe(v.time_to_empty)
        t0 = time.perf_counter()
        decisions = self.policy.decide(snap, now)
        m.tick_seconds.labels(name).observe(time.perf_counter() - t0)
        if not decisions:
            return decisions
        try:
            results = await self.engine.commands([d.to_command() for d in decisions])
        except (EngineError, OSError, asyncio.TimeoutError) as e:
            log.warning(
                "engine refused decisions",
                extra={"engine": name, "decisions": [f"{d.op}:{d.id}" for d in decisions], "error": str(e)},
            )
            m.errors.labels("control_commands").inc()
            return decisions
        for d, r in zip(decisions, results):
            m.decisions.labels(name, d.op).inc()
            if not r.get("ok", False):
                code = (r.get("error") or {}).get("code", "unknown")
                m.decision_failures.labels(name, d.op, code).inc()
            log.info(
                "decision",
                extra={"stream_id": d.id, "engine": name, "decision": d.op, "reason": d.reason, "ok": r.get("ok", False)},
            )
        return decisions

    @staticmethod
    def _record_engine_view(state: dict[str, Any], streams: list[Stream]) -> None:
        by_id = {r["id"]: r for r in state.get("requests", ())}
        for s in streams:
            r = by_id.get(s.id)
            if r is None:
                continue
            s.engine_status = r.get("status", s.engine_status)
            s.kv_device_tokens = int(r.get("kv_device_tokens") or 0)
            s.kv_host_tokens = int(r.get("kv_host_tokens") or 0)
            s.priority = int(r.get("priority") or 0)
            s.preemptions = int(r.get("preemptions") or 0)
