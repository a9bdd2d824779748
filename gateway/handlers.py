"""The HTTP handlers of the client API (routes in gateway/app.py). Each parses its request and hands the work
to the request lifecycle, the relay across replicas or the services; none keeps state of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import __version__, auth
from .api.errors import ApiError, invalid, not_found
from .api.requests import Kind, parse_json
from .api.responses import json_response
from .resume import parse_event_id
from .streams.drain import stream_fields
from .streams.stream import Stream

if TYPE_CHECKING:
    from .lifecycle import RequestLifecycle
    from .relay import Relay
    from .services import Services
    from .streams.base import StreamBase


class Handlers:
    def __init__(self, svc: Services, requests: RequestLifecycle, relay: Relay) -> None:
        self.svc = svc
        self.requests = requests
        self.relay = relay

    # ----- generation -----
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        last_event = request.headers.get("Last-Event-ID")
        if last_event:  # a reconnecting client: resume its stream rather than start a new generation
            sid, after = _event_id(last_event)
            return await self.relay.resume(request, sid, after)
        return await self.requests.serve(request, kind)

    async def stream_events(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/streams/{id}/events``: from ``Last-Event-ID`` if sent (EventSource reconnects), else
        ``?after=``."""
        sid = request.match_info["id"]
        header = request.headers.get("Last-Event-ID")
        if header:
            hsid, after = _event_id(header)
            if hsid != sid:
                raise ApiError(400, "Last-Event-ID names another stream", code="invalid_last_event_id",
                               param="Last-Event-ID")
        else:
            raw = request.query.get("after", "0")
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:  # (isdigit alone takes '²')
                raise ApiError(400, "'after' must be a non-negative integer (tokens already received)",
                               code="invalid_value", param="after")
            after = int(raw)
        return await self.relay.resume(request, sid, after)

    # ----- live streams -----
    async def list_streams(self, request: web.Request) -> web.Response:
        """``GET /v1/streams``: the live streams on this replica that the caller's API key started (an admin
        key: every one)."""
        now = self.svc.clock()
        owners = self.requests.keys
        data = [stream_info(s, now) for s in self.svc.streams.values() if auth.may_see(request, owners.get(s.id))]
        return json_response({"object": "list", "data": data})

    async def get_stream(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        s = self.svc.streams.get(sid)
        # Another key's stream gets the same 404 as an unknown one: ids cannot be probed across keys.
        if s is None or not auth.may_see(request, self.requests.keys.get(sid)):
            raise not_found(f"no live stream with id '{sid}'")
        return json_response(stream_info(s, self.svc.clock()))

    async def report_progress(self, request: web.Request) -> web.Response:
        """``POST /v1/streams/{id}/progress``: the client says how many tokens its user has consumed.

        Web frontends (what is on screen) and voice pipelines (what the synthesizer has spoken) know better than
        the socket how far the user is: the socket only tells what reached the client. A report sets the
        stream's consumed count exactly, so its buffer is exact at that instant; between reports the gateway
        assumes the client goes on at its measured rate (docs/drain-rate.md).

        Body: ``{"consumed_tokens": N}``; ``N`` counts tokens from the start of the answer, as in the events'
        ``id: <stream>:<N>`` lines. It may not go backwards nor beyond what the gateway has written to the client.
        """
        svc = self.svc
        reports = svc.metrics.progress_reports
        sid = request.match_info["id"]
        stream = svc.streams.get(sid)
        if stream is None:
            reports.labels("unknown_stream").inc()
            raise not_found(f"no live stream with id '{sid}'", code="stream_not_found")
        tr = stream.drain
        # The auth middleware already rejected a missing or wrong key; here the key must be the stream's own.
        # Another key gets the same 404 as an unknown stream, so stream ids cannot be probed across keys.
        if tr is not None and tr.owner is not None and auth.key_name(request) != tr.owner:
            raise not_found(f"no live stream with id '{stream.id}'", code="stream_not_found")
        n = _consumed_tokens(parse_json(await request.read()))
        if tr is None or not isinstance(stream, Stream):  # (only a streamed answer's connection is tracked)
            reports.labels("rejected").inc()
            raise ApiError(409, f"stream '{sid}' has no client connection to report on", code="stream_not_attached")
        base = stream.base
        rel = n - base
        last = tr.reported
        if rel < 0 or (last is not None and rel < last):
            reports.labels("rejected").inc()
            prev = base + (last if last is not None else 0)
            raise invalid(f"'consumed_tokens' may not go backwards: {n} < {prev} already reported",
                          param="consumed_tokens", code="progress_backwards")
        if rel > tr.written_tokens:
            reports.labels("rejected").inc()
            raise invalid(f"'consumed_tokens' {n} is beyond the {base + tr.written_tokens} tokens delivered so far",
                          param="consumed_tokens", code="progress_beyond_delivered")
        now = svc.clock()
        tr.report(rel, now)
        reports.labels("accepted").inc()
        return json_response({
            "id": sid,
            "consumed_tokens": n,
            "generated_tokens": stream.generated,
            "delivered_tokens": base + tr.written_tokens,
            "buffer_tokens": int(stream.buffer_tokens(now)),
            "rate": round(stream.rate, 4),
            **tr.info(),
        })

    # ----- models, health, metrics -----
    async def list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "tokenflow", "root": m, "engine": h.name}
            for m, h in self.svc.engines.first_by_model()
        ]
        return json_response({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        engines = {n: ("up" if h.control.healthy else "down") for n, h in self.svc.engines.items()}
        ready = bool(engines) and all(v == "up" for v in engines.values())
        session = self.relay.info()  # a degraded store still serves (from memory): ready, but say so
        status = ("degraded" if session["status"] == "degraded" else "ready") if ready else "not_ready"
        return json_response({"status": status, "engines": engines, "session": session}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        svc = self.svc
        svc.metrics.redis_up.set(1 if svc.store.kind == "redis" and not svc.store.degraded else 0)
        return web.Response(body=svc.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def stream_info(s: StreamBase, now: float) -> dict[str, Any]:
    """A live stream as ``GET /v1/streams`` lists it."""
    r = s.engine_request
    return {
        "id": s.id,
        "engine": s.engine,
        "model": s.model,
        "kind": s.kind,
        "pacing": s.pacing,
        "rate": s.rate,
        "rate_declared": s.rate_declared,
        "engine_status": r.status.value if r is not None else "waiting",
        "engine_seen": r is not None,  # false: submitted (or about to be), not in the engine's state yet
        "generated_tokens": s.generated,
        "consumed_tokens": s.reader.consumed if s.reader.first_token_time is not None else 0,
        "buffer_tokens": s.reader.buffer(now),
        "time_to_empty_s": round(s.reader.time_to_empty(now), 4),
        "stall_s": round(s.reader.stall_time_at(now), 4),
        "age_s": round(now - s.arrival_time, 4),
        "kv_device_tokens": r.kv_device_tokens if r is not None else 0,
        "kv_host_tokens": r.kv_host_tokens if r is not None else 0,
        "priority": r.priority if r is not None else 0,
        "preemptions": r.preemptions if r is not None else 0,
        "finished": s.ended,
        **stream_fields(s, now),  # measured drain: evidence-based buffer, declared vs measured rate, stalled
    }


def _event_id(value: str) -> tuple[str, int]:
    try:
        return parse_event_id(value)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_last_event_id", param="Last-Event-ID") from None


def _consumed_tokens(body: dict[str, Any]) -> int:
    n = body.get("consumed_tokens")
    if not isinstance(n, int) or isinstance(n, bool):
        raise invalid("'consumed_tokens' is required and must be an integer", param="consumed_tokens")
    if n < 0:
        raise invalid(f"'consumed_tokens' must be >= 0, got {n}", param="consumed_tokens")
    unknown = set(body) - {"consumed_tokens"}
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    return n
