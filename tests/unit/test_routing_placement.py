"""Routing with a placement: views from the control loop or the driver's summary, counts when stale."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.api.errors import ApiError
from gateway.config import EngineConfig
from gateway.control import ControlLoop
from gateway.placement import EngineView, PlacementRequest
from gateway.routing import EngineHandle, Engines

NOW = 50.0


class Coordinator:
    def __init__(self, views: dict[str, EngineView]) -> None:
        self.views = views

    def is_driver(self, engine: str) -> bool:
        return False

    def streams_for(self, engine: str, local: list[Any], now: float) -> list[Any]:
        return local

    def publish_view(self, view: EngineView) -> None:
        self.views[view.name] = view

    def published_view(self, engine: str, now: float) -> EngineView | None:
        return self.views.get(engine)


def handle(name: str, coord: Coordinator, *, max_streams: int | None = None, down: str | None = None
           ) -> EngineHandle:
    client = SimpleNamespace(name=name, down=down)
    control = ControlLoop(client, None, list, lambda: NOW, 0.25, None, coord)  # type: ignore[arg-type]
    control.healthy = True
    return EngineHandle(EngineConfig(name=name, max_streams=max_streams), client, control, ["m"])  # type: ignore[arg-type]


def engines(placement: str, coord: Coordinator, **kw: Any) -> Engines:
    es = Engines(placement, max_age_s=2.0, clock=lambda: NOW)
    for n in ("e0", "e1"):
        es.add(handle(n, coord, **kw.get(n, {})))
    return es


def live(*engines_: str) -> list[Any]:
    return [SimpleNamespace(engine=e) for e in engines_]


def view(name: str, free: int, at: float = NOW - 0.5) -> EngineView:
    return EngineView(name, kv_blocks_total=1000, kv_blocks_free=free, at=at)


def test_a_replica_that_does_not_drive_places_with_the_published_views() -> None:
    coord = Coordinator({"e0": view("e0", 100), "e1": view("e1", 900)})
    es = engines("kv-free-first", coord)
    # by this replica's counts e0 (no stream here) would win; the published views say e1 has the free KV
    assert es.route("m", live("e1"), 1).name == "e1"


def test_stale_or_missing_views_fall_back_to_this_replicas_counts() -> None:
    coord = Coordinator({"e0": view("e0", 100), "e1": view("e1", 900, at=NOW - 5.0)})  # e1's is 5 s old
    es = engines("kv-free-first", coord)
    assert es.route("m", live("e1"), 1).name == "e0"  # e1 known by counts only: it ranks after e0
    coord.views.clear()
    assert es.route("m", live("e0", "e0"), 1).name == "e1"  # nothing known: fewest live streams


def test_what_this_replica_placed_since_the_view_counts() -> None:
    coord = Coordinator({"e0": view("e0", 520), "e1": view("e1", 500)})
    es = engines("kv-free-first", coord)
    big = PlacementRequest(prompt_tokens=16 * 100)  # 100 blocks of queued prefill on the engine it goes to
    assert es.route("m", [], 1, big).name == "e0"
    assert es.route("m", [], 1, big).name == "e1"  # e0 has 420 blocks left once that prompt is in


def test_limits_and_down_engines_keep_their_answers() -> None:
    coord = Coordinator({})
    es = engines("tokenflow", coord, e0={"max_streams": 1}, e1={"max_streams": 1})
    with pytest.raises(ApiError) as e:
        es.route("m", live("e0", "e1"), 3)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "3"}
    assert es.route("m", live("e0"), 3).name == "e1"
    es = engines("tokenflow", coord, e0={"down": "no answer"}, e1={"down": "no answer"})
    with pytest.raises(ApiError) as e:
        es.route("m", [], 2)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}


def test_placement_request_estimates_the_prompt_before_tokenizing() -> None:
    from gateway.routing import placement_request

    parts = [{"type": "text", "text": "y" * 40}]
    chat = SimpleNamespace(engine_body={"messages": [{"role": "user", "content": "x" * 400},
                                                     {"role": "user", "content": parts}]}, max_tokens=300, rate=12.0)
    assert placement_request(chat) == PlacementRequest(110, 300, 12.0)  # type: ignore[arg-type]
    ids = SimpleNamespace(engine_body={"prompt": [5] * 77}, max_tokens=None, rate=8.0)
    assert placement_request(ids) == PlacementRequest(77, None, 8.0)  # type: ignore[arg-type]


def test_a_new_view_replaces_the_placements_it_already_includes() -> None:
    coord = Coordinator({"e0": view("e0", 520), "e1": view("e1", 500)})
    es = engines("kv-free-first", coord)
    big = PlacementRequest(prompt_tokens=16 * 100)
    assert [es.route("m", [], 1, big).name for _ in range(3)] == ["e0", "e1", "e0"]
    e0 = es["e0"].view(NOW, 2.0, 0)
    assert e0.queued_prefill_tokens == 2 * 1600 and e0.waiting_requests == 2
    coord.views["e0"] = view("e0", 320, at=NOW + 0.1)  # taken after those placements: they are in it now
    assert es["e0"].view(NOW + 0.2, 2.0, 0).queued_prefill_tokens == 0
    assert es["e1"].view(NOW + 0.2, 2.0, 0).queued_prefill_tokens == 1600
