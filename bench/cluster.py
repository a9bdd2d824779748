"""Several simulated engines on one virtual clock, with the gateway's placement choosing per arrival.

Each engine is driven as bench/virtual.py drives one: every tick its state and the streams placed on it go
through the gateway's ``build_snapshot`` to its own policy instance, and the decisions apply at a step boundary.
Placement sees each engine through ``view_from_snapshot`` of that same snapshot (what the driver replica
publishes in the gateway), plus the requests it placed there since (the gateway's local count does the same).

    from bench.cluster import run_cluster
    r = run_cluster(WorkloadConfig(kind="burst", n=800), n_engines=4, placement="tokenflow", policy="tokenflow",
                    seed=1, profile="h100-llama3-8b")
    r.metrics["ttft_p99_s"], r.metrics["effective_throughput_tps"], r.placed

``run_cluster``'s signature is stable (a capacity planner builds on it): new options come as keyword
arguments with defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.sim.profile import Profile, load_profile
from backends.sim.virtual import VirtualEngine
from gateway.engines.control_api import EngineState
from gateway.placement import EngineView, PlacementRequest, make_placement, view_from_snapshot
from gateway.policy import make_policy
from gateway.policy.snapshot import build_snapshot
from gateway.policy.types import Policy, Snapshot

from .metrics import RequestRecord, summarize
from .virtual import SimStream
from .workload import RequestSpec, WorkloadConfig, generate


@dataclass(slots=True)
class ClusterResult:
    """One run. ``metrics`` has the single-engine bench's keys (bench.metrics.summarize): ``ttft_p50_s``,
    ``ttft_p99_s``, ``effective_throughput_tps``, ``throughput_tps``, ``rebuffer_mean_s``, ``rebuffer_p99_s``,
    ``stalled_share``, ``completed``, ``requests``, ... over every request of the cluster."""

    placement: str
    policy: str
    n_engines: int
    seed: int
    metrics: dict[str, Any]
    records: list[RequestRecord]
    placed: dict[str, int]  # engine -> requests placed there
    assignment: dict[str, str]  # request id -> engine
    end: float  # virtual seconds at the end
    preemptions: int
    engine_counters: dict[str, dict[str, int]] = field(default_factory=dict)


class _Engine:
    """One simulated engine with its own policy and the streams placed on it."""

    def __init__(self, name: str, profile: Profile, policy: Policy, engine_preempt: str,
                 streams: dict[str, SimStream], progress: Callable[[int], None] | None) -> None:
        self.name = name
        self.policy = policy
        self.live: dict[str, SimStream] = {}
        self.arriving: list[SimStream] = []  # placed, arriving during the current tick
        self.done: list[str] = []
        # Generated in full, still being read: the gateway keeps such a stream (it paces it out to its reader),
        # so the live-stream counts a replica places with include it; engine state does not.
        self.reading: list[SimStream] = []

        def on_tokens(now: float, emitted: list[Any]) -> None:
            for e in emitted:
                st = streams[e.id]
                st.on_token(now)
                if e.finish_reason is not None:
                    st.record.finished = True
                    self.done.append(e.id)
            if progress is not None:
                progress(len(emitted))

        self.eng = VirtualEngine(profile, on_tokens=on_tokens, engine_preempt=engine_preempt)

    def snapshot(self, tick_s: float) -> Snapshot:
        return build_snapshot(EngineState.from_json(self.eng.state()), self.live.values(), self.eng.now, tick_s)


def _specs(workload: WorkloadConfig | Sequence[RequestSpec], seed: int) -> list[RequestSpec]:
    if isinstance(workload, WorkloadConfig):
        return generate(workload.with_(seed=seed))
    return sorted(workload, key=lambda s: s.arrival_s)


def run_cluster(
    workload: WorkloadConfig | Sequence[RequestSpec],
    n_engines: int,
    placement: str,
    policy: str,
    seed: int = 1,
    *,
    profile: Profile | str = "h100-llama3-8b",
    tick_s: float = 0.5,
    engine_preempt: str = "recompute",
    policy_knobs: dict[str, Any] | None = None,
    max_time_s: float | None = None,
    idle_limit_s: float = 300.0,
    progress: Callable[[int], None] | None = None,
    pinned: Mapping[str, int] | None = None,
) -> ClusterResult:
    """Serve ``workload`` (a config, generated with ``seed``, or the requests themselves) on ``n_engines``
    identical simulated engines of ``profile``, each under its own ``policy``, with ``placement`` choosing the
    engine of each request at its arrival. Runs until every request finished (or no engine stepped for
    ``idle_limit_s`` after the last arrival, or ``max_time_s``). ``pinned``: requests (by id) that go to a given
    engine (by index) whatever the placement: load that something else put there, to make engines uneven."""
    if n_engines < 1:
        raise ValueError("n_engines must be >= 1")
    prof = load_profile(profile) if isinstance(profile, str) else profile
    specs = _specs(workload, seed)
    place = make_placement(placement)
    streams = {s.id: SimStream(s) for s in specs}
    engines = [_Engine(f"engine-{k}", prof, make_policy(policy, **(policy_knobs or {})), engine_preempt, streams,
                       progress) for k in range(n_engines)]
    by_name = {e.name: e for e in engines}
    if max_time_s is None:
        max_time_s = (specs[-1].arrival_s if specs else 0.0) + 10.0 * sum(
            prof.chunked_prefill_time(s.prompt_tokens) + s.output_tokens * prof.decode_step_time(1, s.prompt_tokens)
            for s in specs) / n_engines + 60.0
    assignment: dict[str, str] = {}
    placed = {e.name: 0 for e in engines}
    remaining = len(specs)
    nxt = 0  # next spec to place
    now = 0.0
    last_progress = (0, 0.0)
    while remaining > 0 and now <= max_time_s:
        steps = sum(e.eng.steps for e in engines)
        if steps != last_progress[0]:
            last_progress = (steps, now)
        elif now - last_progress[1] > idle_limit_s and nxt == len(specs):
            break
        snaps: dict[str, Snapshot] = {}
        for e in engines:
            for rid in e.done:
                st = e.live.pop(rid, None)
                if st is not None:
                    e.reading.append(st)
                e.policy.forget(rid)
                remaining -= 1
            e.done.clear()
            e.reading = [st for st in e.reading if st.buffer_tokens(now) > 0]
            for st in e.arriving:
                e.live[st.id] = st
            e.arriving.clear()
            snaps[e.name] = e.snapshot(tick_s)
        if remaining <= 0:
            break
        # Arrivals of this tick, placed with the tick's views plus what was placed since (the gateway's
        # published view is a tick old at most, and each replica adds what it placed itself).
        views: dict[str, EngineView] = {}
        for e in engines:
            v = view_from_snapshot(e.name, snaps[e.name], now)
            views[e.name] = v.with_counts(v.live_streams + len(e.reading), None, True)
        while nxt < len(specs) and specs[nxt].arrival_s < now + tick_s:
            spec = specs[nxt]
            req = PlacementRequest(spec.prompt_tokens, spec.output_tokens, spec.rate)
            pin = pinned.get(spec.id) if pinned else None
            name = engines[pin].name if pin is not None else place.choose(list(views.values()), req,
                                                                           max(now, spec.arrival_s))
            if name is None:  # no stream limits in the simulation: every engine is always open
                raise RuntimeError("placement chose no engine")
            e = by_name[name]
            e.eng.add(spec.id, spec.prompt_tokens, max_tokens=spec.output_tokens, at=spec.arrival_s)
            views[name] = views[name].with_placed(req)
            assignment[spec.id] = name
            placed[name] += 1
            if spec.arrival_s <= now:
                e.live[spec.id] = streams[spec.id]
            else:
                e.arriving.append(streams[spec.id])
            nxt += 1
        for e in engines:
            if e.live:
                snap = snaps[e.name] if not e.arriving and len(snaps[e.name].streams) == len(e.live) else \
                    e.snapshot(tick_s)
                ds = e.policy.decide(snap, e.eng.now)
                if ds:
                    e.eng.commands([d.to_command() for d in ds])
        now += tick_s
        for e in engines:
            e.eng.run_until(now)
    records = [streams[s.id].record for s in specs]
    preemptions = sum(e.eng.core.counters.preemptions for e in engines)
    counters = {e.name: {"preemptions": e.eng.core.counters.preemptions, "resumes": e.eng.core.counters.resumes,
                         "recomputed_tokens": e.eng.core.counters.recomputed_tokens} for e in engines}
    return ClusterResult(placement=placement, policy=policy, n_engines=n_engines, seed=seed,
                         metrics=summarize(records, preemptions=preemptions), records=records, placed=placed,
                         assignment=assignment, end=now, preemptions=preemptions, engine_counters=counters)


__all__ = ["ClusterResult", "run_cluster"]
