"""Virtual-clock mode: policy + simulated engine core in one process, no HTTP, no wall time.

The gateway side is emulated exactly as the gateway does it: one :class:`ReaderModel` per stream (the
client reading at its rate), a snapshot built every tick with the gateway's own ``build_snapshot`` from the
engine's contract-shaped state, and the policy's decisions applied as control commands at a step boundary.
Tokens reach the client at the end of the engine step that produced them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from backends.sim.profile import Profile
from backends.sim.virtual import VirtualEngine
from gateway.engines.control_api import EngineState
from gateway.policy import make_policy
from gateway.policy.snapshot import build_snapshot
from gateway.policy.types import Policy, ReportsTicks, tick_worth_recording
from gateway.streams.reader import ReaderModel

from .drain_sim import SimulatedDrain
from .http import WARMUP_MAX_TOKENS, WARMUP_PROMPT_TOKENS
from .metrics import RequestRecord
from .workload import RequestSpec


class SimStream:
    """The gateway's view of one client stream (satisfies ``snapshot.BufferSource``).

    ``reader`` is the gateway's model at the declared (or, with measured drain, effective) rate; ``client``
    is the person really reading, at the spec's true rate (the same object when they agree). With
    ``drain="measured"`` the gateway's measured-drain tracker (bench.drain_sim) sets the rate and buffer.
    """

    __slots__ = (
        "arrival_time",
        "client",
        "drain",
        "first_token_time",
        "generated_tokens",
        "id",
        "max_tokens",
        "pacing",
        "rate",
        "reader",
        "record",
    )

    def __init__(self, spec: RequestSpec, drain: str = "declared") -> None:
        self.id = spec.id
        self.arrival_time = spec.arrival_s
        self.max_tokens = spec.output_tokens
        self.rate = spec.rate
        self.reader = ReaderModel(spec.rate)
        true = spec.true_rate or spec.rate
        # measured drain changes the gateway model's rate: the real reader must then be a separate model
        self.client = self.reader if true == spec.rate and drain != "measured" else ReaderModel(true)
        self.record = RequestRecord(spec.id, spec.arrival_s, true, spec.prompt_tokens, spec.output_tokens)
        self.generated_tokens = 0
        self.first_token_time: float | None = None
        self.pacing = "none"  # tokens reach the client when produced
        self.drain = SimulatedDrain(self, self.client, spec.rate, spec.arrival_s) if drain == "measured" else None

    def buffer_tokens(self, now: float) -> float:
        if self.drain is not None:
            self.reader.advance(now)
            return float(self.reader.produced - self.drain.consumed(now, self.reader.consumed))
        return float(self.reader.buffer(now))

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = rate
        self.reader.set_rate(rate, now)

    def on_token(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.generated_tokens += 1
        self.reader.on_tokens(1, now)
        if self.client is not self.reader:
            self.client.on_tokens(1, now)
        self.record.token_times.append(now)


@dataclass(slots=True)
class RunResult:
    policy: str
    records: list[RequestRecord]
    end: float
    preemptions: int
    engine_counters: dict[str, int]
    tick_ms_mean: float
    tick_ms_max: float
    ticks: int
    decisions: dict[str, int] = field(default_factory=dict)
    # Where each request's time to first token went: seconds per engine status seen at the ticks before its
    # first token (held = kept out of the engine by the policy, waiting = in the engine's queue, running =
    # prefill under way), by request id.
    ttft_phases: dict[str, dict[str, float]] = field(default_factory=dict)
    # The policy's own account of its ticks (a policy that reports one: tokenflow), where the gateway would log it:
    # what the GPU runs' "tick" log lines are compared with.
    tick_reports: list[dict[str, Any]] = field(default_factory=list)


def warm_up(eng: VirtualEngine, n: int) -> float:
    """Serve ``n`` requests (``WARMUP_PROMPT_TOKENS`` in, ``WARMUP_MAX_TOKENS`` out) on ``eng`` from its ``now``
    until they are done; returns the time they were. Not measured: what stays is the engine's own measures in its
    state (step times, prefill rate), as a real engine has them after `bench.vllm_gpu burst`'s warm-up or an earlier
    run; a fresh simulated engine has none."""
    for i in range(n):
        eng.add(f"warmup-{i}", WARMUP_PROMPT_TOKENS, max_tokens=WARMUP_MAX_TOKENS)
    return eng.run_until_idle()


def run_virtual(
    profile: Profile,
    specs: list[RequestSpec],
    policy: Policy | str,
    *,
    tick_s: float = 0.5,
    engine_preempt: str = "recompute",
    max_time_s: float | None = None,
    progress: Callable[[int], None] | None = None,
    policy_knobs: dict[str, Any] | None = None,
    idle_limit_s: float = 300.0,
    drain: str = "declared",
    warmup: int = 0,
) -> RunResult:
    """Run one policy over ``specs`` on a fresh virtual engine until every request finished (or the engine
    ran no step for ``idle_limit_s`` of virtual time after the last arrival: requests left paused forever
    then count as unfinished instead of hanging the run). ``warmup``: requests the engine serves first
    (:func:`warm_up`); the run's clock, and every time in the result, starts after them."""
    pol = make_policy(policy, **(policy_knobs or {})) if isinstance(policy, str) else policy
    streams: dict[str, SimStream] = {}
    live: dict[str, SimStream] = {}
    remaining = len(specs)
    done_ids: list[str] = []

    def on_tokens(now: float, emitted: list[Any]) -> None:
        k = 0
        for e in emitted:
            st = streams.get(e.id)
            if st is None:
                continue  # a warm-up request
            k += 1
            st.on_token(now)
            if e.finish_reason is not None:
                st.record.finished = True
                done_ids.append(e.id)
        if progress is not None and k:
            progress(k)

    eng = VirtualEngine(profile, on_tokens=on_tokens, engine_preempt=engine_preempt)
    t_warm = warm_up(eng, warmup) if warmup else 0.0
    before = replace(eng.core.counters)  # what the warm-up counted, left out of the run's counters
    if t_warm:  # the workload arrives after the warm-up (on the engine's clock; shifted back below)
        specs = [replace(x, arrival_s=x.arrival_s + t_warm) for x in specs]
    streams.update((s.id, SimStream(s, drain)) for s in specs)  # drain: "declared" rates only, or "measured"
    order = sorted(specs, key=lambda s: s.arrival_s)
    for s in order:
        eng.add(s.id, s.prompt_tokens, max_tokens=s.output_tokens, at=s.arrival_s)
    if max_time_s is None:
        # generous: every request alone, one after another, would finish well inside this
        max_time_s = (order[-1].arrival_s if order else 0.0) + 10.0 * sum(
            profile.chunked_prefill_time(s.prompt_tokens)
            + s.output_tokens * profile.decode_step_time(1, s.prompt_tokens)
            for s in specs
        ) + 60.0

    lag = profile.control_lag_steps
    arrived = 0
    tick_total = 0.0
    tick_max = 0.0
    ticks = 0
    decisions: dict[str, int] = {}
    phases: dict[str, dict[str, float]] = {}
    reports = isinstance(pol, ReportsTicks)
    tick_reports: list[dict[str, Any]] = []
    now = t_warm
    last_progress = (0, t_warm)  # (engine steps, when): a run where the engine stops stepping ends early
    while remaining > 0 and now <= max_time_s:
        produced = eng.steps
        if produced != last_progress[0]:
            last_progress = (produced, now)
        elif now - last_progress[1] > idle_limit_s and arrived == len(order):
            break
        while arrived < len(order) and order[arrived].arrival_s <= now:
            live[order[arrived].id] = streams[order[arrived].id]
            arrived += 1
        for rid in done_ids:
            live.pop(rid, None)
            pol.forget(rid)
            remaining -= 1
        done_ids.clear()
        if live:
            for st in live.values():
                if st.drain is not None:  # measured drain: one sample per tick, as the gateway's sampler
                    st.drain.sample(now)
            snap = build_snapshot(EngineState.from_json(eng.control_state()), live.values(), now, tick_s)
            for v in snap.streams:
                if v.first_token_time is None:  # this tick's interval counts to the status it starts in
                    ph = phases.setdefault(v.id, {})
                    ph[v.status.value] = ph.get(v.status.value, 0.0) + tick_s
            t0 = time.perf_counter()
            ds = pol.decide(snap, now)
            dt = time.perf_counter() - t0
            tick_total += dt
            tick_max = max(tick_max, dt)
            ticks += 1
            if reports:
                report = cast("ReportsTicks", pol).tick_report()
                if tick_worth_recording(report, bool(ds)):
                    tick_reports.append({"t": round(now, 3), **report})
            if ds:
                if lag:  # the engine runs on while the commands travel (profile engine.control_lag_steps)
                    eng.run_steps(lag)
                eng.commands([d.to_command() for d in ds])
                for d in ds:
                    decisions[d.op] = decisions.get(d.op, 0) + 1
        if remaining <= 0:
            break
        # the next tick is due tick_s after this one's read, as the gateway schedules it (later if a step runs on)
        now = eng.run_until(max(now + tick_s, eng.now))
    if t_warm:  # the run's clock from the warm-up's end, as a run on a warm real engine is timed
        for st in streams.values():
            rec = st.record
            rec.arrival -= t_warm
            rec.token_times[:] = [t - t_warm for t in rec.token_times]
        for tr in tick_reports:
            tr["t"] = round(tr["t"] - t_warm, 3)
        now -= t_warm
    c = eng.core.counters
    counters = {k: getattr(c, k) - getattr(before, k)
                for k in ("preemptions", "resumes", "prefetches", "host_restored_tokens", "recomputed_tokens")}
    return RunResult(
        policy=pol.name,
        records=[streams[s.id].record for s in specs],
        end=now,
        preemptions=counters["preemptions"],
        engine_counters=counters,
        tick_ms_mean=1000.0 * tick_total / ticks if ticks else 0.0,
        tick_ms_max=1000.0 * tick_max,
        ticks=ticks,
        decisions=decisions,
        ttft_phases=phases,
        tick_reports=tick_reports,
    )


def expected_tokens(specs: list[RequestSpec]) -> int:
    return sum(s.output_tokens for s in specs)


__all__ = ["RunResult", "SimStream", "expected_tokens", "run_virtual"]
