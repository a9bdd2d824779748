"""HTTP routes of the demo page: the static files, ``/demo/info`` and the burst control."""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..api.errors import ApiError, invalid, not_found
from ..api.requests import parse_json
from ..api.responses import expect_continue

if TYPE_CHECKING:
    from ..config import DemoConfig
    from ..services import Services
    from .burst import Burst

STATIC = Path(__file__).with_name("static")

# ``tokenflow serve --demo`` without engines of its own: two embedded simulated engines, identical but for the
# policy that schedules them, so the burst compares policies on the same hardware and the same users.
DEMO_ENGINES: list[dict[str, Any]] = [
    {"name": "sim-tokenflow", "profile": "sim-small", "models": ["sim-small"], "policy": "tokenflow"},
    {"name": "sim-fcfs", "profile": "sim-small", "models": ["sim-small-fcfs"], "policy": "fcfs"},
]

BURST_TIMEOUT_S = 300.0  # a burst that has not ended by then is cut (its users disconnect, freeing the engines)
MAX_OUTPUT_TOKENS = 1024
# The page is a static bundle from this origin: no inline script, nothing loaded from elsewhere.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _bundle() -> dict[str, tuple[bytes, str]]:
    """The page's files (a few KB), read once: each name's bytes and content type."""
    out = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            out[path.name] = (path.read_bytes(), ctype)
    return out


class DemoPage:
    def __init__(self, svc: Services, cfg: DemoConfig) -> None:
        self.svc = svc
        self.cfg = cfg
        self.burst: Burst | None = None
        self._task: asyncio.Task[None] | None = None
        # Served from memory by name rather than by aiohttp's static route, whose 404 and 416 (a Range beyond
        # the file) are empty bodies made after any middleware has run: every error here is OpenAI's JSON.
        self.files = _bundle()

    def _file(self, name: str, headers: dict[str, str] | None = None) -> web.Response:
        found = self.files.get(name)
        if found is None:
            raise not_found(f"no file '{name[:100]}' in the demo page")
        body, ctype = found
        return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "no-cache", **(headers or {})})

    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html", {"Content-Security-Policy": _CSP})

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def lanes(self) -> list[dict[str, Any]]:
        """Every engine with the policy that schedules it and the model that reaches it."""
        out = []
        for name, h in self.svc.engines.items():
            if not h.models:
                continue
            simulated = h.config.url is None
            out.append({"engine": name, "policy": getattr(h.control.policy, "name", "?"), "model": h.models[0],
                        "simulated": simulated, "profile": h.config.profile if simulated else None})
        return out

    async def info(self, request: web.Request) -> web.Response:
        streams = self.svc.cfg.streams
        return _json({"engines": self.lanes(), "max_users": self.cfg.max_users, "rate_classes": streams.rate_classes,
                      "default_rate": streams.default_rate})

    async def start_burst(self, request: web.Request) -> web.Response:
        from .burst import Burst, BurstSettings  # the simulated users (bench's clients) only load when used

        body = parse_json(await request.read())
        users = _int(body, "users", 1, self.cfg.max_users, required=True)
        output = _int(body, "output_tokens", 16, MAX_OUTPUT_TOKENS, default=200)
        seed = _int(body, "seed", 0, 2**31 - 1, default=1)
        unknown = set(body) - {"users", "output_tokens", "seed"}
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        if self.burst is not None and self.burst.running:
            raise ApiError(409, "a burst is already running; wait for it to end", code="burst_running")
        lanes = [(e["engine"], e["policy"], e["model"]) for e in self.lanes()]
        loop = asyncio.get_running_loop()
        burst = Burst(BurstSettings(users, output, seed), lanes, loop.time() + 0.2)
        # The users connect to this very server, on the address this request came in on.
        host, port = request.transport.get_extra_info("sockname")[:2] if request.transport else ("127.0.0.1", 0)
        host = f"[{host}]" if ":" in host else host
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        self.burst = burst
        self._task = asyncio.ensure_future(burst.run(f"http://{host}:{port}", headers, BURST_TIMEOUT_S))
        return _json(burst.view(loop.time()), status=202)

    async def burst_status(self, request: web.Request) -> web.Response:
        if self.burst is None:
            return _json({"status": "idle", "lanes": []})
        return _json(self.burst.view(asyncio.get_running_loop().time()))

    async def close(self, app: web.Application) -> None:
        """On shutdown: a running burst's users disconnect first, so they do not hold the server's shutdown."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _int(body: dict[str, Any], name: str, lo: int, hi: int, *, default: int | None = None, required: bool = False
         ) -> int:
    v = body.get(name, default)
    if v is None and required:
        raise invalid(f"'{name}' is required", param=name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise invalid(f"'{name}' must be an integer from {lo} to {hi}", param=name)
    return v


def register(app: web.Application, svc: Services, cfg: DemoConfig) -> None:
    page = DemoPage(svc, cfg)
    r, x = app.router, expect_continue
    r.add_get("/", page.index, expect_handler=x)
    r.add_get("/demo/static/{name}", page.static, expect_handler=x)
    r.add_get("/demo/info", page.info, expect_handler=x)
    r.add_post("/demo/burst", page.start_burst, expect_handler=x)
    r.add_get("/demo/burst", page.burst_status, expect_handler=x)
    app.on_shutdown.append(page.close)
