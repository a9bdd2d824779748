"""The engines this replica drives, and which one serves a request for a model."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .api.errors import ApiError, at_capacity

if TYPE_CHECKING:
    from .config import EngineConfig
    from .control import ControlLoop
    from .engines.client import EngineClient
    from .streams.base import StreamBase


@dataclass(slots=True, eq=False)
class EngineHandle:
    config: EngineConfig
    client: EngineClient
    control: ControlLoop
    models: list[str]
    embedded: Any = None  # the in-process simulated engine, when embedded

    @property
    def name(self) -> str:
        return self.config.name


class Engines(Mapping[str, "EngineHandle"]):
    """Engines by name, and by model (several engines may serve one)."""

    def __init__(self) -> None:
        self._by_name: dict[str, EngineHandle] = {}
        self._by_model: dict[str, list[EngineHandle]] = {}

    def add(self, handle: EngineHandle) -> None:
        self._by_name[handle.name] = handle
        for m in handle.models:
            self._by_model.setdefault(m, []).append(handle)

    def __getitem__(self, name: str) -> EngineHandle:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def models(self) -> set[str]:
        return set(self._by_model)

    def first_by_model(self) -> list[tuple[str, EngineHandle]]:
        """Each model with the first engine that serves it, sorted by model (``GET /v1/models``)."""
        return sorted((m, hs[0]) for m, hs in self._by_model.items())

    def route(self, model: str, live: Iterable[StreamBase], retry_after_s: int,
              exclude: Collection[str] = ()) -> EngineHandle:
        """The engine for a new request: with one engine and no stream limit, that one; otherwise the healthy
        engine with the fewest live streams below its limit (429 when every one is at its limit). Engines
        marked down (gateway/engines/liveness.py) are skipped, and so are those named in ``exclude`` (an engine
        that just failed a stream, before liveness marks it down); none left: 503 with Retry-After, at once."""
        candidates = self._by_model.get(model)
        if not candidates:  # parse_request already checked the name; this is a guard
            raise ApiError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
        up = [c for c in candidates if c.client.down is None and c.name not in exclude]
        if not up:
            why = candidates[0].client.down or "excluded"
            raise ApiError(503, f"no engine serving '{model}' is up ({why}); retry shortly",
                           type="server_error", code="engine_unavailable", headers={"Retry-After": str(retry_after_s)})
        candidates = up
        limited = any(c.config.max_streams is not None for c in candidates)
        if len(candidates) == 1 and not limited:
            return candidates[0]
        load = {c.name: 0 for c in candidates}
        for s in live:
            if s.engine in load:
                load[s.engine] += 1
        open_ = [c for c in candidates if c.config.max_streams is None or load[c.name] < c.config.max_streams]
        if not open_:
            raise at_capacity(f"every engine serving '{model}' is at its stream limit; retry shortly",
                              "engine_at_capacity", retry_after_s)
        return min(open_, key=lambda c: (not c.control.healthy, load[c.name]))
