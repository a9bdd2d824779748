"""The andes baseline: trigger, QoE-gain packing and its preemption cap."""

from __future__ import annotations

from gateway.policy import make_policy
from gateway.policy.andes import AndesPolicy
from gateway.policy.types import EngineStatus, EngineView, Snapshot, StreamView

R, W, H = EngineStatus.RUNNING, EngineStatus.WAITING, EngineStatus.HELD


def engine(capacity: int, used: int, seqs: int = 64) -> EngineView:
    return EngineView("e", 16, seqs, 1024, capacity, used, 1_000_000, 0, 0.02, 1000.0, 10_000.0, 1e9, 1e9)


def sv(i: str, status: EngineStatus, buf: float, started: bool = True, ctx: int = 1000) -> StreamView:
    return StreamView(i, status, 1.0, 10.0, ctx, 0 if not started else 10, buf, 5.0 if started else None, 500,
                      ctx if status is R else 0, ctx if started else 0)


def test_registered() -> None:
    assert isinstance(make_policy("andes"), AndesPolicy)


def test_serves_everyone_when_not_memory_bound() -> None:
    s = Snapshot(engine(100_000, 2_000), (sv("a", R, 50.0), sv("h", H, 500.0)), 0.5)
    assert [(d.op, d.id) for d in AndesPolicy().decide(s, 10.0)] == [("resume", "h")]


def test_new_request_displaces_a_buffered_runner() -> None:
    s = Snapshot(engine(2_300, 2_100),
                 (sv("rich", R, 400.0), sv("poor", R, 0.0), sv("new", W, 0.0, started=False)), 0.5)
    ds = AndesPolicy().decide(s, 10.0)
    assert ("preempt", "rich") in [(d.op, d.id) for d in ds]
    assert ("preempt", "poor") not in [(d.op, d.id) for d in ds]


def test_preemption_cap_limits_average_preemptions_per_request() -> None:
    # Two requests seen, cap P = 1: at most two preemptions in total, however often it is asked.
    pol = AndesPolicy(preemption_cap=1.0)
    total = 0
    for tick in range(6):
        s = Snapshot(engine(2_300, 2_100), (sv("a", R, 400.0 + tick), sv("b", R, 390.0), ), 0.5)
        # a third, new request appears each tick under a fresh id only in the first tick
        if tick == 0:
            s = Snapshot(s.engine, s.streams + (sv("n0", W, 0.0, started=False),), 0.5)
        total += sum(1 for d in pol.decide(s, 10.0 + tick) if d.op == "preempt")
    assert pol.requests_seen == 3
    assert total <= 3
    capped = AndesPolicy(preemption_cap=0.0)
    s = Snapshot(engine(2_300, 2_100),
                 (sv("rich", R, 400.0), sv("poor", R, 0.0), sv("new", W, 0.0, started=False)), 0.5)
    assert not [d for d in capped.decide(s, 10.0) if d.op == "preempt"]
