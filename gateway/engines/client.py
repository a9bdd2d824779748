"""HTTP client for one engine: its OpenAI streaming endpoint and its control API.

The gateway only speaks docs/engine-control-api.md and the OpenAI API; nothing here knows which engine
is behind the URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

CONTROL_VERSION = "1"


class EngineError(Exception):
    """The engine failed or answered with an error."""

    def __init__(self, message: str, status: int = 502, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(slots=True)
class Delta:
    text: str
    tokens: int
    finish_reason: str | None
    usage: dict[str, int] | None


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
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)
        self._control_timeout = aiohttp.ClientTimeout(total=10)

    # --- OpenAI side ---
    async def open_stream(self, kind: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            resp = await self.session.post(
                self.base_url + path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, timeout=self._timeout
            )
        except (aiohttp.ClientError, OSError) as e:
            raise EngineError(f"engine '{self.name}' is unreachable: {e}", status=503) from e
        if resp.status != 200:
            raw = await resp.read()
            resp.release()
            try:
                err = orjson.loads(raw)
            except orjson.JSONDecodeError:
                err = None
            msg = _error_message(err) or raw[:500].decode(errors="replace")
            # 4xx from the engine is the client's fault (for example a prompt too long); pass it on.
            raise EngineError(msg, status=resp.status if 400 <= resp.status < 500 else 502, body=err)
        return resp

    @staticmethod
    async def delta_batches(resp: aiohttp.ClientResponse, kind: str) -> AsyncIterator[list[Delta]]:
        """Parse the engine's SSE stream: per network read, the deltas of every complete event in it.

        Several tokens ready at once cost one read and one iteration, not a readline per line: the bytes are
        split into lines in C and only ``data:`` lines are decoded.
        """
        content = resp.content
        chat = kind == "chat"
        rest = b""
        while True:
            chunk = await content.readany()
            if not chunk:  # EOF: an unterminated last line still counts
                if rest:
                    batch, done = _parse_lines([rest], chat)
                    if batch:
                        yield batch
                return
            nl = chunk.rfind(b"\n")
            if nl < 0:
                rest += chunk
                continue
            lines = (rest + chunk[:nl] if rest else chunk[:nl]).split(b"\n")
            rest = chunk[nl + 1:]
            batch, done = _parse_lines(lines, chat)
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


def _parse_lines(lines: list[bytes], chat: bool) -> tuple[list[Delta], bool]:
    """The deltas of the ``data:`` lines among ``lines``, and whether ``[DONE]`` was among them."""
    out: list[Delta] = []
    for line in lines:
        if not line.startswith(b"data:"):
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return out, True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise EngineError("engine sent a malformed stream chunk") from None
        if "error" in obj:
            raise EngineError(_error_message(obj) or "engine error", body=obj)
        usage = obj.get("usage")
        choices = obj.get("choices")
        if not choices:
            if usage:
                out.append(Delta("", 0, None, usage))
            continue
        c = choices[0]
        if chat:
            text = (c.get("delta") or {}).get("content") or ""
        else:
            text = c.get("text") or ""
        ids = c.get("token_ids")
        out.append(Delta(text, len(ids) if ids is not None else (1 if text else 0), c.get("finish_reason"), usage))
    return out, False


def _error_message(obj: Any) -> str | None:
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return obj["message"]
    return None
