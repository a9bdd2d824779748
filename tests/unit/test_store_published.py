"""Published stream states and the remote BufferSource the engine's driver schedules with."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.config import SessionConfig
from gateway.engines.control_api import EngineState
from gateway.policy.snapshot import build_snapshot
from gateway.relay import Relay
from gateway.state import PublishedStream, RemoteStream
from gateway.state.memory import MemoryStore


def test_published_round_trip_and_clock_mapping() -> None:
    p = PublishedStream("s1", 1000.0, 64, 8.0, 30, 1001.5, 12.0, True)
    assert PublishedStream.from_list(p.to_list()) == p
    # Published at wall 1002 (local monotonic 52 = wall 1002 - 950); read at local 52.5.
    r = RemoteStream.from_published(p, 1002.0, 1002.5, 52.5)
    assert (r.arrival_time, r.first_token_time, r.at) == (50.0, 51.5, 52.0)
    assert r.buffer_tokens(52.0) == 12.0
    assert r.buffer_tokens(52.5) == 8.0  # the client kept reading at 8 tok/s
    assert r.buffer_tokens(60.0) == 0.0
    unstarted = RemoteStream.from_published(PublishedStream("s2", 1000.0, None, 8.0, 0, None, 0.0, True),
                                            1002, 1002, 52)
    assert unstarted.buffer_tokens(99.0) == 0.0


def test_driver_snapshot_merges_local_and_remote_streams() -> None:
    forgotten: list[str] = []
    policy = SimpleNamespace(forget=forgotten.append)
    store = MemoryStore(SessionConfig(), ["sim"])
    engines = {"sim": SimpleNamespace(control=SimpleNamespace(policy=policy))}
    svc = SimpleNamespace(engines=engines, streams={}, store=store)
    relay = Relay(svc, SimpleNamespace())  # type: ignore[arg-type]
    remote = [RemoteStream("r1", 1.0, 10, 5.0, 3, 1.5, 2.0, 2.0, True),
              RemoteStream("l1", 1.0, 10, 5.0, 4, 1.5, 9.0, 2.0, True),   # a client attached elsewhere: wins
              RemoteStream("l2", 1.0, 10, 5.0, 4, 1.5, 9.0, 2.0, False)]  # the owner's copy: the local one wins
    store.remote_streams = lambda engine, now: remote  # type: ignore[method-assign]
    local = [SimpleNamespace(id="l1", attached=False), SimpleNamespace(id="l2", attached=True)]
    merged = {s.id: s for s in relay.streams_for("sim", local, 2.0)}  # type: ignore[arg-type]
    assert set(merged) == {"r1", "l1", "l2"}
    assert isinstance(merged["l1"], RemoteStream) and not isinstance(merged["l2"], RemoteStream)
    state = EngineState.from_json(
        {"engine": {}, "requests": [{"id": "r1", "status": "running", "kv_device_tokens": 40}]})
    snap = build_snapshot(state, [merged["r1"]], 2.0, 0.25)
    assert snap.streams[0].kv_device_tokens == 40 and snap.streams[0].buffer_tokens == 2.0
    remote = [r for r in remote if r.id != "r1"]  # r1 ended on its replica
    relay.streams_for("sim", local, 2.5)  # type: ignore[arg-type]
    assert forgotten == ["r1"]
