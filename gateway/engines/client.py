"""HTTP client for one engine: its OpenAI streaming endpoint and its control API.

The gateway only speaks docs/engine-control-api.md and the OpenAI API; nothing here knows which engine
is behind the URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

from .sse_parse import Delta, EngineError, _error_message, parse_lines
from .stream import ConnectionPool, EngineStream

__all__ = ["CONTROL_VERSION", "Delta", "EngineClient", "EngineError", "EngineStream"]

CONTROL_VERSION = "1"


class EngineClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        control_token: str | None = None,
        request_timeout_s: float = 3600.0,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._headers = {"Authorization": f"Bearer {control_token}"} if control_token else {}
        self._request_timeout_s = request_timeout_s
        self.pool = ConnectionPool(self.base_url)  # keep-alive connections for engine streams
        self._control_timeout = aiohttp.ClientTimeout(total=10)

    # --- OpenAI side ---
    async def open_stream(self, kind: str, body: dict[str, Any]) -> EngineStream:
        """Start a streaming request; its deltas are read by an :class:`EngineStream` (one callback per read)."""
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        upstream = await EngineStream.open(self.name, self.pool, path, kind, orjson.dumps(body),
                                           {"Content-Type": "application/json"}, self._request_timeout_s)
        if upstream.status != 200:
            raw = upstream.error_body
            upstream.close()
            try:
                err = orjson.loads(raw)
            except orjson.JSONDecodeError:
                err = None
            msg = _error_message(err) or raw[:500].decode(errors="replace") or f"HTTP {upstream.status}"
            # 4xx from the engine is the client's fault (for example a prompt too long); pass it on.
            raise EngineError(msg, status=upstream.status if 400 <= upstream.status < 500 else 502, body=err)
        return upstream

    @staticmethod
    async def delta_batches(resp: "EngineStream | aiohttp.ClientResponse", kind: str) -> AsyncIterator[list[Delta]]:
        """Parse the engine's SSE stream: per network read, the deltas of every complete event in it.

        Several tokens ready at once cost one read and one iteration, not a readline per line: the bytes are
        split into lines in C and only ``data:`` lines are decoded. (The gateway's data path uses
        :meth:`EngineStream.consume`, which does the same with no task wake-up per read.)
        """
        if isinstance(resp, EngineStream):
            async for batch in resp.batches():
                yield batch
            return
        content = resp.content
        chat = kind == "chat"
        rest = b""
        while True:
            chunk = await content.readany()
            if not chunk:  # EOF: an unterminated last line still counts
                if rest:
                    batch, done = parse_lines([rest], chat)
                    if batch:
                        yield batch
                return
            nl = chunk.rfind(b"\n")
            if nl < 0:
                rest += chunk
                continue
            lines = (rest + chunk[:nl] if rest else chunk[:nl]).split(b"\n")
            rest = chunk[nl + 1:]
            batch, done = parse_lines(lines, chat)
            if batch:
                yield batch
            if done:
                return

    @staticmethod
    async def deltas(resp: aiohttp.ClientResponse, kind: str) -> AsyncIterator[Delta]:
        """Parse the engine's SSE stream into deltas (one per chunk)."""
        async for batch in EngineClient.delta_batches(resp, kind):
            for d in batch:
                yield d

    def close(self) -> None:
        """Close the idle stream connections (streams in flight close their own)."""
        self.pool.close()

    # --- control side ---
    async def state(self) -> dict[str, Any]:
        async with self.session.get(
            self.base_url + "/control/v1/state", headers=self._headers, timeout=self._control_timeout
        ) as resp:
            if resp.status != 200:
                raise EngineError(f"engine '{self.name}' state: HTTP {resp.status}", status=502)
            if resp.headers.get("X-TokenFlow-Control-Version") != CONTROL_VERSION:
                raise EngineError(f"engine '{self.name}' does not speak control API v{CONTROL_VERSION}", status=502)
            return orjson.loads(await resp.read())

    async def commands(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if not commands:
            return []
        async with self.session.post(
            self.base_url + "/control/v1/commands",
            data=orjson.dumps({"commands": list(commands)}),
            headers={**self._headers, "Content-Type": "application/json"},
            timeout=self._control_timeout,
        ) as resp:
            if resp.status != 200:
                raise EngineError(f"engine '{self.name}' commands: HTTP {resp.status}", status=502)
            return orjson.loads(await resp.read())["results"]

    async def models(self) -> list[str]:
        async with self.session.get(self.base_url + "/v1/models", timeout=self._control_timeout) as resp:
            if resp.status != 200:
                raise EngineError(f"engine '{self.name}' models: HTTP {resp.status}", status=502)
            data = orjson.loads(await resp.read())
            return [m["id"] for m in data.get("data", ())]
