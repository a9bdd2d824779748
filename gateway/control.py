"""The control loop: every tick, per engine, snapshot -> policy -> decisions -> engine.

It never blocks the data path: a slow or dead engine control API only delays this engine's next tick. Its
state request is also the engine's heartbeat: a failed or unanswered one (``down_after_s``) marks the engine
down, which fails new requests fast and ends the streams that went silent (gateway/engines/liveness.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from .engines.client import EngineClient, EngineError
from .engines.control_api import EngineState
from .metrics import Metrics
from .placement import EngineView, view_from_snapshot
from .policy.snapshot import BufferSource, build_snapshot
from .policy.types import Decision, Policy, ReportsTicks, tick_worth_recording
from .streams.base import StreamBase

log = logging.getLogger("tokenflow.control")


class Coordinator(Protocol):
    """Several replicas: whether this one drives the engine, and every replica's streams on it."""

    def is_driver(self, engine: str) -> bool: ...

    def streams_for(self, engine: str, local: list[BufferSource], now: float) -> list[BufferSource]: ...

    def publish_view(self, view: EngineView) -> None:
        """This replica drives the engine: share its placement view with every replica."""

    def published_view(self, engine: str, now: float) -> EngineView | None:
        """The view the engine's driver published last (``at`` on the local clock), if any."""


class ControlLoop:
    def __init__(
        self,
        engine: EngineClient,
        policy: Policy,
        streams: Callable[[], Iterable[StreamBase]],
        clock: Callable[[], float],
        tick_interval_s: float,
        metrics: Metrics,
        coordinator: Coordinator | None = None,
        *,
        down_after_s: float = 2.0,
        stall_timeout_s: float = 15.0,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self._streams = streams
        self._clock = clock
        self.tick_interval_s = tick_interval_s
        self.metrics = metrics
        self.last_state: EngineState | None = None
        self.healthy = False
        self.ticks = 0
        self._last_answer: float | None = None  # when the engine last answered a state request
        self.coordinator = coordinator
        self.down_after_s = down_after_s
        self.stall_timeout_s = stall_timeout_s
        self._reports = isinstance(policy, ReportsTicks)
        self.driving = coordinator is None  # this replica runs the policy for the engine
        self.view: EngineView | None = None  # placement's view of the engine, from this replica's last snapshot
        # Build that view each tick: the app turns it on for engines that share a model with another.
        self.placing = False
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
            state = await self.engine.state()  # EngineError only (the client maps every transport error)
        except EngineError as e:
            if self.healthy or self.engine.down is None:
                log.warning("engine marked down: its control API did not answer",
                            extra={"engine": name, "error": str(e)})
            self.healthy = False
            self.view = None
            self.engine.mark_down(str(e))
            self.metrics.engine_up.labels(name).set(0)
            now = self._clock()
            if self._last_answer is None:
                self._last_answer = now  # never answered since start: count from the first failure
            # Streams end only once the engine missed a second heartbeat: a one-off slow answer (a long step on
            # a loaded engine) turns new requests away for a moment but never cuts held, silent streams.
            if now - self._last_answer < 2 * self.down_after_s:
                return []
            dead = self.engine.fail_silent(now, self.down_after_s)
            if dead:
                self.metrics.errors.labels("engine_down").inc(len(dead))
                log.warning("streams ended: their engine is down", extra={"engine": name, "streams": len(dead)})
            return []
        if not self.healthy and self.engine.down is not None:
            log.warning("engine up again", extra={"engine": name})
        self.healthy = True
        self._last_answer = self._clock()
        self.engine.mark_up()
        stalled = self.engine.fail_stalled(state, self._clock(), self.stall_timeout_s)
        if stalled:
            self.metrics.errors.labels("engine_stalled").inc(len(stalled))
            log.warning("streams ended: running in the engine but silent",
                        extra={"engine": name, "streams": [s.request_id for s in stalled]})
        self.last_state = state
        self.ticks += 1
        m = self.metrics
        m.engine_up.labels(name).set(1)
        eng = state.engine
        if eng.kv_device_capacity_tokens:
            m.engine_kv_device.labels(name).set(eng.kv_device_used_tokens / eng.kv_device_capacity_tokens)
        if eng.kv_host_capacity_tokens:
            m.engine_kv_host.labels(name).set(eng.kv_host_used_tokens / eng.kv_host_capacity_tokens)
        m.engine_counters.update(name, state.counters)

        now = self._clock()
        streams = [s for s in self._streams() if not s.ended]
        self._record_engine_view(state, streams)
        sources: list[BufferSource] = list(streams)
        if self.coordinator is not None:
            self.driving = self.coordinator.is_driver(name)
            if not self.driving:
                self.view = None  # placement reads the driver's published view instead
                return []  # another replica schedules this engine (it sees our streams' published state)
            sources = self.coordinator.streams_for(name, sources, now)
        snap = build_snapshot(state, sources, now, self.tick_interval_s)
        if self.placing:
            self.view = view_from_snapshot(name, snap, now)
            if self.coordinator is not None:
                self.coordinator.publish_view(self.view)
        views = snap.streams
        m.buffer.labels(name).observe_many([v.buffer_tokens for v in views])
        m.time_to_empty.labels(name).observe_many([v.time_to_empty for v in views if v.first_token_time is not None])
        t0 = time.perf_counter()
        decisions = self.policy.decide(snap, now)
        m.tick_seconds.labels(name).observe(time.perf_counter() - t0)
        if self._reports:
            self._report_tick(name, bool(decisions))
        if not decisions:
            return decisions
        try:
            results = await self.engine.commands([d.to_command() for d in decisions])
        except EngineError as e:
            log.warning(
                "engine refused decisions",
                extra={"engine": name, "decisions": [f"{d.op}:{d.id}" for d in decisions], "error": str(e)},
            )
            m.errors.labels("control_commands").inc()
            return decisions
        for d, r in zip(decisions, results):
            m.decisions.labels(name, d.op).inc()
            if not r.ok:
                m.decision_failures.labels(name, d.op, r.error_code or "unknown").inc()
            log.info(
                "decision",
                extra={"stream_id": d.id, "engine": name, "decision": d.op, "reason": d.reason, "ok": r.ok},
            )
        return decisions

    def _report_tick(self, name: str, decided: bool) -> None:
        """The policy's own account of the tick, as gauges every tick and as a log line when it decided something
        or held new requests out of the engine (so a log shows why a request waited before its first token)."""
        report = cast("ReportsTicks", self.policy).tick_report()
        m = self.metrics
        for key, gauge in (("working_set", m.policy_working_set), ("admitted", m.policy_admitted),
                           ("capacity_tps", m.policy_capacity), ("demand_tps", m.policy_demand)):
            v = report.get(key)
            if isinstance(v, (int, float)):
                gauge.labels(name).set(v)
        for key, why in (("held_new", "admission"), ("deferred_new", "device")):
            v = report.get(key)
            if isinstance(v, (int, float)):
                m.policy_held_new.labels(name, why).set(v)
        if tick_worth_recording(report, decided):
            log.info("tick", extra={"engine": name, **report})

    def placement_view(self, now: float, max_age_s: float) -> EngineView | None:
        """The engine as placement should see it: this replica's own view when it drives the engine, else the
        one its driver published; None when neither is younger than ``max_age_s`` (or the engine is down)."""
        if self.engine.down is not None:
            return None
        view = self.view
        if view is None and self.coordinator is not None:
            view = self.coordinator.published_view(self.engine.name, now)
        if view is None or now - view.at > max_age_s:
            return None
        return view

    @staticmethod
    def _record_engine_view(state: EngineState, streams: list[StreamBase]) -> None:
        requests = state.requests
        for s in streams:
            r = requests.get(s.id)
            if r is not None:
                s.engine_request = r
