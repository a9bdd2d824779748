"""Response shapes of the client API that are not errors: JSON bodies and the SSE stream's headers."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer
}


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Every route's ``Expect`` handler. aiohttp calls it before any middleware, and its own answers a value
    other than ``100-continue`` with a text/plain 417 (a 500 when the value is not UTF-8): here a JSON 417."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return ApiError(417, "the only expectation supported is 'Expect: 100-continue'", code="expectation_failed",
                        param="Expect").response()
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (the answer proper has not started)
    return None


async def no_route(request: web.Request) -> web.StreamResponse:
    """The last route, matching every path: what no other route serves is a 404, or a 405 naming the methods
    its path takes, raised into the error middleware (OpenAI's JSON) after the ``Expect`` handler above."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()
