"""VirtualEngine: the discrete-event shell around EngineCore."""

from __future__ import annotations

from collections import defaultdict

import pytest

from backends.sim.core import Emitted
from backends.sim.profile import load_profile
from backends.sim.virtual import VirtualEngine

SMALL = load_profile("sim-small")


def recorder():
    tokens: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def cb(now: float, emitted: list[Emitted]) -> None:
        for e in emitted:
            tokens[e.id].append((e.position, now))

    return tokens, cb


def test_future_arrivals_wake_an_idle_engine_at_their_time() -> None:
    tokens, cb = recorder()
    eng = VirtualEngine(SMALL, on_tokens=cb)
    eng.add("a", 100, 3, at=2.0)
    assert eng.run_until(1.0) == 1.0 and not tokens  # idle until then: time jumps exactly
    end = eng.run_until_idle()
    first = tokens["a"][0][1]
    assert first == pytest.approx(2.0 + SMALL.prefill_time(100))
    assert [i for i, _ in tokens["a"]] == [0, 1, 2]
    assert end == tokens["a"][-1][1]
    assert eng.state()["requests"] == []


def test_run_until_stops_at_the_first_step_boundary_after_t() -> None:
    eng = VirtualEngine(SMALL)
    eng.add("a", 10, 100)
    now = eng.run_until(0.105)
    assert now >= 0.105 and now < 0.105 + 0.02
    out = eng.state()["requests"][0]["output_tokens"]
    assert out >= 10
    # commands apply at that boundary
    assert eng.command("preempt", "a")["status"] == "held"
    eng.run_until(now + 1.0)
    assert eng.state()["requests"][0]["output_tokens"] == out
    res = eng.commands([{"op": "resume", "id": "a"}, {"op": "bogus", "id": "a"}, {"op": "abort", "id": "zz"}])
    assert [r["ok"] for r in res] == [True, False, False]
    assert res[1]["error"]["code"] == "invalid_command" and res[2]["error"]["code"] == "not_found"
    eng.run_until_idle()
    assert eng.state()["engine"]["counters"]["host_restored_tokens"] > 0


def test_run_until_idle_stops_with_only_held_requests() -> None:
    eng = VirtualEngine(SMALL)
    eng.add("a", 10, 100)
    eng.run_until(0.05)
    eng.command("preempt", "a")
    eng.run_until_idle()  # must return: nothing can change without a command
    assert eng.state()["engine"]["num_held"] == 1
    eng.abort("a")
    assert eng.state()["requests"] == []


def test_burst_on_h200_profile_completes_every_token() -> None:
    """A scaled-down paper burst (100 x 512 in, 256 out) on the H200 profile."""
    count = 0
    done: set[str] = set()

    def cb(now: float, emitted: list[Emitted]) -> None:
        nonlocal count
        count += len(emitted)
        done.update(e.id for e in emitted if e.finish_reason)

    eng = VirtualEngine(load_profile("h200-llama3-8b"), on_tokens=cb)
    for i in range(100):
        eng.add(f"r{i}", 512, 256, at=0.0)
    end = eng.run_until_idle()
    assert count == 100 * 256 and len(done) == 100
    assert 0 < end < 60
    eng.core.check_invariants()
    st = eng.state()["engine"]
    assert st["kv_device_used_tokens"] == 0 and st["kv_host_used_tokens"] == 0


def test_duplicate_ids_are_refused_when_added() -> None:
    from backends.sim.core import DuplicateId

    eng = VirtualEngine(SMALL)
    eng.add("a", 10, 5, at=1.0)
    with pytest.raises(DuplicateId):
        eng.add("a", 10, 5, at=2.0)
    eng.add("b", 10, 5)
    with pytest.raises(DuplicateId):
        eng.add("b", 10, 5, at=3.0)
    eng.run_until_idle()
    eng.add("a", 10, 5, at=eng.now + 1)  # finished ids may come back
    eng.run_until_idle()
    assert eng.state()["requests"] == []
