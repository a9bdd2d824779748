"""build_snapshot and the engine state parser fill every field from the right source (both construct their
objects positionally, for speed: a swapped argument of the same type would go unnoticed by the type checker)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.engines.control_api import EngineState, EngineStatus, RequestState
from gateway.policy.snapshot import build_snapshot
from gateway.policy.types import StreamView

ENGINE = {"name": "e", "block_size": 16, "max_num_seqs": 8, "kv_device_capacity_tokens": 1000}


@dataclass
class Source:
    id: str
    arrival_time: float
    max_tokens: int | None
    rate: float
    generated_tokens: int
    first_token_time: float | None
    stalled: bool = False

    def buffer_tokens(self, now: float) -> float:
        return now * 100


def test_request_state_fields() -> None:
    r = RequestState.from_json({"id": "a", "status": "held", "priority": 1, "prompt_tokens": 2,
                                "kv_device_tokens": 3, "kv_host_tokens": 4, "preemptions": 5})
    assert r == RequestState(id="a", status=EngineStatus.HELD, priority=1, prompt_tokens=2, kv_device_tokens=3,
                             kv_host_tokens=4, preemptions=5)
    assert RequestState.from_json({"id": "b", "status": "bogus"}) == RequestState(id="b")


def test_every_view_field_comes_from_its_source() -> None:
    state = EngineState.from_json({"engine": ENGINE, "requests": [
        {"id": "a", "status": "held", "priority": 1, "prompt_tokens": 11, "kv_device_tokens": 12,
         "kv_host_tokens": 13, "preemptions": 14},
        {"id": "not-ours", "status": "running"},
    ]})
    a = Source("a", 1.5, 41, 21.0, 31, 2.5, stalled=True)
    b = Source("b", 3.5, None, 22.0, 0, None)  # submitted, not yet listed by the engine
    snap = build_snapshot(state, [a, b], 7.0, 0.25)
    assert snap.tick_interval_s == 0.25 and snap.engine == state.engine
    assert snap.streams == (
        StreamView(id="a", status=EngineStatus.HELD, arrival_time=1.5, rate=21.0, prompt_tokens=11, generated_tokens=31,
                   buffer_tokens=700.0, first_token_time=2.5, max_tokens=41, kv_device_tokens=12, kv_host_tokens=13,
                   priority=1, preemptions=14, stalled=True),
        StreamView(id="b", status=EngineStatus.WAITING, arrival_time=3.5, rate=22.0, prompt_tokens=0,
                   generated_tokens=0, buffer_tokens=700.0, first_token_time=None, max_tokens=None, kv_device_tokens=0,
                   kv_host_tokens=0, priority=0, preemptions=0, stalled=False),
    )
