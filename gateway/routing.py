"""The engines this replica drives, and which one serves a request for a model."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .api.errors import ApiError, at_capacity
from .placement import EngineView, Placement, PlacementRequest, make_placement

if TYPE_CHECKING:
    from .api.requests import ClientRequest
    from .config import EngineConfig
    from .control import ControlLoop
    from .engines.client import EngineClient
    from .streams.base import StreamBase


def placement_request(creq: ClientRequest) -> PlacementRequest:
    """What placement knows of a request before an engine tokenizes it: its prompt's length, estimated at four
    characters a token (a list of token ids counts exactly), its max_tokens and its reader's rate."""
    body = creq.engine_body
    chars = tokens = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, list):
        tokens = sum(1 for p in prompt if isinstance(p, int)) or 0
        chars = sum(len(p) for p in prompt if isinstance(p, str))
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return PlacementRequest(max(1, tokens + chars // 4), creq.max_tokens, creq.rate)


@dataclass(slots=True, eq=False)
class EngineHandle:
    config: EngineConfig
    client: EngineClient
    control: ControlLoop
    models: list[str]
    embedded: Any = None  # the in-process simulated engine, when embedded
    # Requests this replica placed here, (time, request), newest last: added to a view taken before them.
    placed: list[tuple[float, PlacementRequest]] = field(default_factory=list)
    # The last view with the placements since added, and how many of ``placed`` it holds: each route adds
    # only the newest placement instead of all since the view (many per tick under load).
    _base: EngineView | None = None
    _adjusted: EngineView | None = None
    _applied: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    def view(self, now: float, max_age_s: float, live: int) -> EngineView:
        """Placement's view: the control loop's (or its driver's) view with what this replica placed since, or,
        with none fresh, the counts alone (``informed`` False). ``live_streams`` is always this replica's count,
        as least-outstanding has always counted."""
        v = self.control.placement_view(now, max_age_s)
        if v is None:
            self._base = self._adjusted = None
            cutoff = now - max_age_s
            self.placed = [p for p in self.placed if p[0] >= cutoff]
            return EngineView(name=self.name, healthy=self.control.healthy, informed=False, live_streams=live,
                              stream_limit=self.config.max_streams)
        if v is not self._base:  # a new view: it includes what was placed before it was taken
            self.placed = [p for p in self.placed if p[0] >= v.at]
            self._base, self._adjusted, self._applied = v, v, 0
        adjusted = self._adjusted or v
        for _, req in self.placed[self._applied:]:
            adjusted = adjusted.with_placed(req)
        self._adjusted, self._applied = adjusted, len(self.placed)
        return adjusted.with_counts(live, self.config.max_streams, self.control.healthy)


class Engines(Mapping[str, "EngineHandle"]):
    """Engines by name, and by model (several engines may serve one)."""

    def __init__(self, placement: Placement | str = "least-outstanding", *, max_age_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_name: dict[str, EngineHandle] = {}
        self._by_model: dict[str, list[EngineHandle]] = {}
        self.placement = make_placement(placement) if isinstance(placement, str) else placement
        self.max_age_s = max_age_s
        self._clock = clock

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

    def shares_a_model(self, handle: EngineHandle) -> bool:
        """Another engine serves one of ``handle``'s models: placement has a choice to make there."""
        return any(len(self._by_model.get(m, ())) > 1 for m in handle.models)

    def first_by_model(self) -> list[tuple[str, EngineHandle]]:
        """Each model with the first engine that serves it, sorted by model (``GET /v1/models``)."""
        return sorted((m, hs[0]) for m, hs in self._by_model.items())

    def route(self, model: str, live: Iterable[StreamBase], retry_after_s: int,
              request: PlacementRequest | None = None, exclude: Collection[str] = ()) -> EngineHandle:
        """The engine for a new request: with one engine and no stream limit, that one; otherwise the placement's
        choice among the engines up and below their stream limit (429 when every one is at its limit). Engines
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
        if len(open_) == 1:
            return open_[0]
        now = self._clock()
        req = request or PlacementRequest(prompt_tokens=0)
        views = [c.view(now, self.max_age_s, load[c.name]) for c in open_]
        name = self.placement.choose(views, req, now)
        chosen = self._by_name[name] if name is not None and name in load else open_[0]
        chosen.placed.append((now, req))
        return chosen
