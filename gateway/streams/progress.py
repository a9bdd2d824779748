"""``POST /v1/streams/{id}/progress``: the client says how many tokens its user has consumed.

Web frontends (what is on screen) and voice pipelines (what the synthesizer has spoken) know better than
the socket how far the user is: the socket only tells what reached the client. A report sets the stream's
consumed count exactly, so its buffer is exact at that instant; between reports the gateway assumes the
client goes on at its measured rate (docs/drain-rate.md).

Body: ``{"consumed_tokens": N}``; ``N`` counts tokens from the start of the answer, as in the events'
``id: <stream>:<N>`` lines. It may not go backwards nor beyond what the gateway has written to the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..api.errors import ApiError, invalid, not_found
from ..api.requests import parse_json

if TYPE_CHECKING:
    from ..app import Gateway
    from .stream import Stream

try:  # API keys (gateway/auth.py): a stream is reported on with the key that opened it
    from ..auth import KEY_ATTR
except ImportError:  # pragma: no cover - auth not present
    KEY_ATTR = None  # type: ignore[assignment]


def owner_of(request: web.Request) -> str | None:
    """The name of the API key that authenticated ``request`` (None when the gateway runs without keys)."""
    if KEY_ATTR is None:
        return None
    key = request.get(KEY_ATTR)
    return None if key is None else key.name


def _authorize(request: web.Request, stream: "Stream") -> None:
    # The auth middleware already rejected a missing or wrong key; here the key must be the stream's own.
    # Another key gets the same 404 as an unknown stream, so stream ids cannot be probed across keys.
    tr = stream.drain
    owner = tr.owner if tr is not None else None
    if owner is not None and owner_of(request) != owner:
        raise not_found(f"no live stream with id '{stream.id}'", code="stream_not_found")


def _parse(body: dict[str, Any]) -> int:
    n = body.get("consumed_tokens")
    if not isinstance(n, int) or isinstance(n, bool):
        raise invalid("'consumed_tokens' is required and must be an integer", param="consumed_tokens")
    if n < 0:
        raise invalid(f"'consumed_tokens' must be >= 0, got {n}", param="consumed_tokens")
    unknown = set(body) - {"consumed_tokens"}
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    return n


async def report_progress(gw: "Gateway", request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    stream = gw.streams.get(sid)
    if stream is None:
        gw.metrics.progress_reports.labels("unknown_stream").inc()
        raise not_found(f"no live stream with id '{sid}'", code="stream_not_found")
    _authorize(request, stream)
    n = _parse(parse_json(await request.read()))
    tr = stream.drain
    if tr is None:
        gw.metrics.progress_reports.labels("rejected").inc()
        raise ApiError(409, f"stream '{sid}' has no client connection to report on", code="stream_not_attached")
    base = stream.base
    rel = n - base
    last = tr.reported
    if rel < 0 or (last is not None and rel < last):
        gw.metrics.progress_reports.labels("rejected").inc()
        prev = base + (last if last is not None else 0)
        raise invalid(f"'consumed_tokens' may not go backwards: {n} < {prev} already reported", param="consumed_tokens", code="progress_backwards")
    if rel > tr.written_tokens:
        gw.metrics.progress_reports.labels("rejected").inc()
        raise invalid(
            f"'consumed_tokens' {n} is beyond the {base + tr.written_tokens} tokens delivered so far",
            param="consumed_tokens", code="progress_beyond_delivered",
        )
    now = gw.loop_time()
    tr.report(rel, now)
    gw.metrics.progress_reports.labels("accepted").inc()
    body = {
        "id": sid,
        "consumed_tokens": n,
        "generated_tokens": stream.generated,
        "delivered_tokens": base + tr.written_tokens,
        "buffer_tokens": int(stream.buffer_tokens(now)),
        "rate": round(stream.rate, 4),
        **tr.info(),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def route(gw: "Gateway") -> Any:
    async def handler(request: web.Request) -> web.Response:
        return await report_progress(gw, request)

    return handler
