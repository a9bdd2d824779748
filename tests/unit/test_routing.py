"""Routing between engines of one model: skips engines marked down and those a failover excludes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.api.errors import ApiError
from gateway.routing import EngineHandle, Engines


def _engine(name: str, down: bool = False) -> EngineHandle:
    cfg: Any = SimpleNamespace(name=name, max_streams=None)
    client: Any = SimpleNamespace(down="marked down" if down else None)
    control: Any = SimpleNamespace(healthy=not down, placement_view=lambda now, max_age_s: None)  # counts only
    return EngineHandle(cfg, client, control, ["m"])


def _live(*engines: str) -> list[Any]:
    return [SimpleNamespace(engine=e) for e in engines]


def test_route_prefers_the_engine_with_fewer_streams_and_honours_exclude() -> None:
    engines = Engines()
    for h in (_engine("a"), _engine("b")):
        engines.add(h)
    assert engines.route("m", _live("a", "a"), 1).name == "b"
    assert engines.route("m", _live("a", "a"), 1, exclude={"b"}).name == "a"  # a failover from b


def test_route_with_every_engine_excluded_or_down_is_a_503_with_retry_after() -> None:
    engines = Engines()
    for h in (_engine("a"), _engine("b", down=True)):
        engines.add(h)
    with pytest.raises(ApiError) as e:
        engines.route("m", [], 3, exclude={"a"})
    assert e.value.status == 503 and e.value.code == "engine_unavailable"
    assert e.value.headers == {"Retry-After": "3"}
