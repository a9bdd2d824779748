"""HTTP client for one engine: its OpenAI streaming endpoint and its control API.

The gateway only speaks docs/engine-control-api.md and the OpenAI API; nothing here knows which engine
is behind the URL. Whatever goes wrong on the way (a refused or reset connection, a timeout, a bad answer)
leaves this client as an :class:`EngineError`, so its callers handle one exception type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson

from . import control_api as api
from . import liveness
from .control_api import CommandResult, EngineState
from .sse_parse import (
    EngineDelta,
    EngineDown,
    EngineError,
    EngineStalled,
    EngineTimeout,
    EngineUnreachable,
    _error_message,
    parse_lines,
)
from .stream import ConnectionPool, EngineStream

__all__ = ["EngineClient", "EngineDelta", "EngineDown", "EngineError", "EngineStalled", "EngineStream",
           "EngineTimeout", "EngineUnreachable"]

Command = dict[str, Any]  # {"op": ..., "id": ..., ["priority": int]}, as Decision.to_command() builds it


@contextmanager
def transport_errors(what: str) -> Iterator[None]:
    """Map the transport's exceptions to EngineError subclasses (httpcore's ``map_exceptions``); ``what`` names
    the call in their messages."""
    try:
        yield
    except EngineError:
        raise
    except TimeoutError as e:  # before OSError: TimeoutError is one
        raise EngineTimeout(f"{what}: timed out") from e
    except (aiohttp.ClientError, OSError) as e:
        raise EngineUnreachable(f"{what}: {e!r}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # an answer that is not what the API promises
        raise EngineError(f"{what}: malformed answer ({e!r})") from e


class EngineClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        control_token: str | None = None,
        request_timeout_s: float = 3600.0,
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 30.0,
        state_timeout_s: float = 2.0,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._headers = {"Authorization": f"Bearer {control_token}"} if control_token else {}
        self._request_timeout_s = request_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self.pool = ConnectionPool(self.base_url)  # keep-alive connections for engine streams
        self._control_timeout = aiohttp.ClientTimeout(total=10, connect=connect_timeout_s)
        # The liveness probe: a state request not answered within this marks the engine down (the control loop).
        self._state_timeout = aiohttp.ClientTimeout(total=state_timeout_s)
        self.down: EngineDown | None = None  # why the engine is marked down; None while it answers (or untried)
        self.streams: dict[int, EngineStream] = {}  # open engine streams (ended ones leave at the next prune)

    # --- liveness (decided by the control loop, gateway/engines/liveness.py) ---
    def mark_down(self, reason: str) -> None:
        """New streams fail at once with :class:`EngineDown` until :meth:`mark_up`."""
        self.down = EngineDown(f"engine '{self.name}' is down: {reason}")

    def mark_up(self) -> None:
        self.down = None

    def _register(self, stream: EngineStream) -> None:
        self.streams[id(stream)] = stream

    def open_streams(self) -> list[EngineStream]:
        """The streams still open (ended ones are dropped here)."""
        live = self.streams
        for key in [k for k, s in live.items() if s.ended]:
            del live[key]
        return list(live.values())

    def fail_silent(self, now: float, quiet_s: float) -> list[EngineStream]:
        """The engine is down: end its streams that received nothing for ``quiet_s`` with the reason."""
        err = self.down or EngineDown(f"engine '{self.name}' is down")
        dead = liveness.silent(self.open_streams(), now, quiet_s)
        for s in dead:
            s.fail(err)
        return dead

    def fail_stalled(self, state: EngineState, now: float, stall_s: float) -> list[EngineStream]:
        """End the streams of requests the engine reports running that sent nothing for ``stall_s`` while it kept
        them running (one call per answered state request: it also notes what the engine did with each)."""
        streams = self.open_streams()
        liveness.observe(streams, state.requests, now)
        dead = liveness.stalled(streams, state.requests, now, stall_s)
        for s in dead:
            s.fail(EngineStalled(f"engine '{self.name}' reports the request running but sent nothing on its "
                                 f"stream for {stall_s:g} s"))
        return dead

    # --- OpenAI side ---
    async def open_stream(self, kind: str, body: dict[str, Any], request_id: str | None = None) -> EngineStream:
        """Start a streaming request; its deltas are read by an :class:`EngineStream` (one callback per read).
        ``request_id`` (the control API's id) lets the liveness checks match it with the engine's state.
        EngineDown at once while the engine is marked down."""
        if self.down is not None:
            raise self.down
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        upstream = await EngineStream.open(self.name, self.pool, path, kind, orjson.dumps(body),  # EngineError only
                                           {"Content-Type": "application/json"}, self._request_timeout_s,
                                           self._connect_timeout_s, self._first_byte_timeout_s, request_id,
                                           self._register)
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
    async def delta_batches(resp: EngineStream | aiohttp.ClientResponse, kind: str) -> AsyncIterator[list[EngineDelta]]:
        """Parse the engine's SSE stream: per network read, the deltas of every complete event in it.

        Several tokens ready at once cost one read and one iteration, not a readline per line: the bytes are
        split into lines in C and only ``data:`` lines are decoded. (The gateway's data path uses
        :meth:`EngineStream.consume`, which does the same with no task wake-up per read.)
        """
        if isinstance(resp, EngineStream):
            async for batch in resp.batches():
                yield batch
            return
        with transport_errors("engine stream"):
            async for batch in EngineClient._client_response_batches(resp, kind == "chat"):
                yield batch

    @staticmethod
    async def _client_response_batches(resp: aiohttp.ClientResponse, chat: bool) -> AsyncIterator[list[EngineDelta]]:
        content = resp.content
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
    async def deltas(resp: EngineStream | aiohttp.ClientResponse, kind: str) -> AsyncIterator[EngineDelta]:
        """Parse the engine's SSE stream into deltas (one per chunk)."""
        async for batch in EngineClient.delta_batches(resp, kind):
            for d in batch:
                yield d

    def close(self) -> None:
        """Close the idle stream connections (streams in flight close their own)."""
        self.pool.close()

    # --- control side ---
    async def state(self) -> EngineState:
        with transport_errors(f"engine '{self.name}' state"):
            async with self.session.get(
                self.base_url + api.STATE_PATH, headers=self._headers, timeout=self._state_timeout
            ) as resp:
                if resp.status != 200:
                    raise EngineError(f"engine '{self.name}' state: HTTP {resp.status}", status=502)
                if resp.headers.get(api.VERSION_HEADER) != api.VERSION:
                    raise EngineError(f"engine '{self.name}' does not speak control API v{api.VERSION}", status=502)
                return EngineState.from_json(orjson.loads(await resp.read()))

    async def commands(self, commands: Sequence[Command]) -> list[CommandResult]:
        """Send ``commands`` in order, in calls of at most ``MAX_COMMANDS``; one result per command."""
        results: list[CommandResult] = []
        for i in range(0, len(commands), api.MAX_COMMANDS):
            results += await self._commands(commands[i:i + api.MAX_COMMANDS])
        return results

    async def _commands(self, batch: Sequence[Command]) -> list[CommandResult]:
        with transport_errors(f"engine '{self.name}' commands"):
            async with self.session.post(
                self.base_url + api.COMMANDS_PATH,
                data=orjson.dumps({"commands": list(batch)}),
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=self._control_timeout,
            ) as resp:
                if resp.status != 200:
                    raise EngineError(f"engine '{self.name}' commands: HTTP {resp.status}", status=502)
                results = [CommandResult.from_json(r) for r in orjson.loads(await resp.read())["results"]]
                if len(results) != len(batch):
                    raise EngineError(f"engine '{self.name}' commands: {len(results)} results for {len(batch)} "
                                      "commands", status=502)
                return results

    async def abort(self, request_id: str) -> None:
        """End a request the gateway no longer needs (its client left before the engine finished)."""
        await self.commands([{"op": "abort", "id": request_id}])

    async def models(self) -> list[str]:
        with transport_errors(f"engine '{self.name}' models"):
            async with self.session.get(self.base_url + "/v1/models", timeout=self._control_timeout) as resp:
                if resp.status != 200:
                    raise EngineError(f"engine '{self.name}' models: HTTP {resp.status}", status=502)
                data = orjson.loads(await resp.read())
                return [m["id"] for m in data.get("data", ())]
