"""Each placement on hand-built engine views (pure: no engine, no clock)."""

from __future__ import annotations

import pytest

from gateway.engines.control_api import EngineView as EngineState
from gateway.placement import (
    EngineView,
    PlacementRequest,
    available,
    make_placement,
    predicted_ttft,
    view_from_snapshot,
)
from gateway.policy.types import EngineStatus, Snapshot, StreamView

REQ = PlacementRequest(prompt_tokens=512, max_tokens=1024, rate=20.0)
NOW = 100.0


def ev(name: str, **kw: object) -> EngineView:
    base: dict[str, object] = dict(kv_blocks_total=10_000, kv_blocks_free=5_000, max_num_seqs=256, step_time_s=0.02,
                                   prefill_tps=20_000.0, decode_tps=10_000.0, headroom=(15_000.0, 60_000.0,
                                   180_000.0, 600_000.0), at=NOW)
    base.update(kw)
    return EngineView(name=name, **base)  # type: ignore[arg-type]


def test_every_placement_is_registered_and_unknown_names_fail() -> None:
    assert available() == ["kv-free-first", "least-outstanding", "round-robin", "tokenflow"]
    with pytest.raises(ValueError, match="unknown placement"):
        make_placement("random")


@pytest.mark.parametrize("name", ["tokenflow", "least-outstanding", "round-robin", "kv-free-first"])
def test_no_open_engine_gives_none_and_closed_ones_are_never_chosen(name: str) -> None:
    p = make_placement(name)
    down = ev("a", up=False)
    full = ev("b", live_streams=4, stream_limit=4)
    assert p.choose([down, full], REQ, NOW) is None
    for _ in range(3):  # round-robin's turn must skip them too
        assert p.choose([down, full, ev("c", live_streams=50)], REQ, NOW) == "c"


def test_least_outstanding_fewest_live_streams_healthy_first() -> None:
    p = make_placement("least-outstanding")
    assert p.choose([ev("a", live_streams=5), ev("b", live_streams=3), ev("c", live_streams=4)], REQ, NOW) == "b"
    assert p.choose([ev("a", live_streams=5), ev("b", live_streams=3, healthy=False)], REQ, NOW) == "a"


def test_round_robin_takes_turns() -> None:
    p = make_placement("round-robin")
    views = [ev("a", live_streams=0), ev("b", live_streams=100), ev("c", live_streams=7)]
    assert [p.choose(views, REQ, NOW) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_kv_free_first_counts_the_prompts_queued_there() -> None:
    p = make_placement("kv-free-first")
    a = ev("a", kv_blocks_free=3_000)
    b = ev("b", kv_blocks_free=4_000, queued_prefill_tokens=20_000)  # 4,000 blocks, 1,250 of them spoken for
    assert p.choose([a, b], REQ, NOW) == "a"
    assert p.choose([a, ev("b", kv_blocks_free=4_000)], REQ, NOW) == "b"


def test_tokenflow_sends_to_the_engine_whose_streams_hold_deep_buffers_although_it_has_more() -> None:
    # a: 200 streams, but they hold seconds unread: their KV and slots can be lent, the readers want little.
    a = ev("a", live_streams=200, running_requests=200, kv_blocks_free=100, kv_blocks_yieldable=8_000,
           yieldable_streams=180)
    # b: 120 streams reading from near-empty buffers: the engine must feed them, nothing is spare.
    b = ev("b", live_streams=120, running_requests=120, kv_blocks_free=2_000, headroom=(-2_000.0, -8_000.0,
           -20_000.0, -50_000.0))
    assert make_placement("least-outstanding").choose([a, b], REQ, NOW) == "b"
    assert make_placement("tokenflow").choose([a, b], REQ, NOW) == "a"
    assert predicted_ttft(a, REQ) < 0.1 < predicted_ttft(b, REQ)


def test_tokenflow_accounts_for_queued_prefill() -> None:
    a = ev("a", queued_prefill_tokens=200_000, waiting_requests=400, kv_blocks_free=20_000)  # 10 s of prompts
    b = ev("b", live_streams=300)
    assert predicted_ttft(a, REQ) == pytest.approx(200_512 / 20_000 + 0.02)
    assert make_placement("tokenflow").choose([a, b], REQ, NOW) == "b"


def test_tokenflow_waits_for_kv_at_the_rate_it_is_released() -> None:
    a = ev("a", kv_blocks_free=0, kv_release_tps=1_000.0)
    b = ev("b", kv_blocks_free=0, kv_release_tps=100.0)
    assert predicted_ttft(a, REQ) == pytest.approx(512 / 20_000 + 0.02 + 512 / 1_000)
    assert make_placement("tokenflow").choose([b, a], REQ, NOW) == "a"


def test_tokenflow_spreads_by_headroom_when_every_engine_starts_it_at_once() -> None:
    p = make_placement("tokenflow")
    views = {n: ev(n) for n in "abcd"}
    chosen = []
    for _ in range(8):  # each placement takes its share of the headroom of the view it lands in
        name = p.choose(list(views.values()), REQ, NOW)
        assert name is not None
        chosen.append(name)
        views[name] = views[name].with_placed(REQ)
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c", "d", "d"]


def test_tokenflow_without_engine_state_falls_back_to_counts() -> None:
    p = make_placement("tokenflow")
    views = [EngineView("a", informed=False, live_streams=9), EngineView("b", informed=False, live_streams=2)]
    assert p.choose(views, REQ, NOW) == "b"


def test_summary_round_trips_through_json() -> None:
    v = ev("a", kv_blocks_yieldable=12, yieldable_streams=3, queued_prefill_tokens=900, waiting_requests=2,
           running_requests=40, demand_tps=310.5, kv_release_tps=1234.5, live_streams=45)
    back = EngineView.from_json(v.to_json(), at=7.0)
    assert back == EngineView(**{**{f: getattr(v, f) for f in v.__dataclass_fields__}, "at": 7.0})
    with pytest.raises(KeyError):
        EngineView.from_json({"n": "a"}, at=0.0)


def _stream(i: str, status: EngineStatus, buf: float, *, started: bool = True, kv: int = 1_600) -> StreamView:
    return StreamView(i, status, 50.0, 20.0, 512, 100 if started else 0, buf, 60.0 if started else None, 1024,
                      kv if status is EngineStatus.RUNNING else 0, 0)


def test_view_from_snapshot_counts_deep_buffers_as_yieldable_and_queued_prompts_as_work() -> None:
    state = EngineState("e", 16, 256, 131072, 160_000, 4_800, 0, 0, 0.02, None, 20_000.0, None, None)
    snap = Snapshot(state, (
        _stream("deep", EngineStatus.RUNNING, buf=200.0),  # 10 s unread at 20 tok/s
        _stream("thin", EngineStatus.RUNNING, buf=10.0),  # 0.5 s
        _stream("new", EngineStatus.WAITING, buf=0.0, started=False),
    ), 0.5)
    v = view_from_snapshot("e", snap, NOW)
    assert (v.kv_blocks_total, v.kv_blocks_free) == (10_000, 9_700)
    assert (v.yieldable_streams, v.kv_blocks_yieldable) == (1, 100)
    assert (v.running_requests, v.waiting_requests, v.queued_prefill_tokens) == (2, 1, 512)
    assert v.demand_tps == 20.0  # only the thin one's reader needs the engine now
    assert v.live_streams == 3 and v.at == NOW
    # The deep buffer covers its reader for 10 s: within 2 s and 8 s it wants nothing, the thin one does.
    deeper = view_from_snapshot("e", Snapshot(state, (_stream("deep", EngineStatus.RUNNING, buf=200.0),
                                                      _stream("thin", EngineStatus.RUNNING, buf=200.0),
                                                      _stream("new", EngineStatus.WAITING, 0.0, started=False)),
                                              0.5), NOW)
    assert deeper.headroom[0] - v.headroom[0] == pytest.approx(20.0 * 2 - 10.0)
    placed = v.with_placed(REQ)
    assert placed.queued_prefill_tokens == 1024 and placed.waiting_requests == 2 and placed.live_streams == 4
    assert all(p < h for p, h in zip(placed.headroom, v.headroom))
