"""A small HTTP client for the contract suite: the OpenAI streaming endpoint and the control API.

Engine-agnostic on purpose: it never looks at token text or timings, only at token counts (chunk
``token_ids``, falling back to one token per non-empty chunk) and at what docs/engine-control-api.md
promises.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from gateway.engines import control_api

# Generous: the suite also runs against a real engine on a loaded CPU machine.
TIMEOUT = float(os.environ.get("TOKENFLOW_CONTRACT_TIMEOUT", "60"))
PROMPT = "Write a long story about a lighthouse keeper who collects stones."
STATUSES = control_api.STATUSES  # what the gateway's engine client parses: every engine must use exactly these


def new_id(tag: str = "ct") -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


async def poll(pred: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Poll until ``pred()`` returns a truthy value; return it. Raises AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


class Stream:
    """A streaming completion whose chunks are read by a background task."""

    def __init__(self, rid: str, max_tokens: int) -> None:
        self.rid = rid
        self.max_tokens = max_tokens
        self.resp: aiohttp.ClientResponse | None = None
        self.task: asyncio.Task[None] | None = None
        self.count = 0  # output tokens received
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.saw_done = False
        self.chunks = 0
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    async def _read(self) -> None:
        assert self.resp is not None
        try:
            async for raw in self.resp.content:
                await asyncio.sleep(0)  # a buffered line does not yield: let the test's control calls in between
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.saw_done = True
                    break
                obj = orjson.loads(payload)
                self.chunks += 1
                if obj.get("usage"):
                    self.usage = obj["usage"]
                for c in obj.get("choices") or ():
                    ids = c.get("token_ids")
                    if ids is not None:
                        self.token_ids.extend(ids)
                        self.count += len(ids)
                    else:
                        text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                        self.count += 1 if text else 0
                    if c.get("finish_reason") is not None:
                        self.finish_reason = c["finish_reason"]
                self._changed.set()
        except (aiohttp.ClientError, asyncio.CancelledError, ConnectionError) as e:
            self.error = e
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._changed.set()

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def wait_tokens(self, n: int, timeout: float = TIMEOUT) -> None:
        async def ok() -> bool:
            assert not (self.done and self.count < n), f"stream ended after {self.count} tokens (< {n})"
            return self.count >= n

        await poll(ok, timeout, f"{n} tokens on {self.rid}")

    async def finished(self, timeout: float = TIMEOUT) -> None:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        assert self.error is None, f"stream {self.rid} failed: {self.error!r}"

    def disconnect(self) -> None:
        """Close the connection abruptly, as a client that goes away does."""
        if self.resp is not None:
            self.resp.close()
        if self.task is not None:
            self.task.cancel()


class EngineAPI:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.s = session
        self._model: str | None = None
        self.streams: list[Stream] = []

    async def model(self) -> str:
        if self._model is None:
            async with self.s.get(self.url + "/v1/models") as r:
                assert r.status == 200
                self._model = (await r.json())["data"][0]["id"]
        return self._model

    async def body(self, rid: str | None, max_tokens: int, *, priority: int = 0, chat: bool = False,
                   stream: bool = True) -> dict[str, Any]:
        b: dict[str, Any] = {"model": await self.model(), "max_tokens": max_tokens, "stream": stream,
                             "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        if chat:
            b["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            b["prompt"] = PROMPT
        if stream:
            b["stream_options"] = {"include_usage": True}
        if rid is not None:
            b["vllm_xargs"] = {"tokenflow_id": rid}
        if priority:
            b["priority"] = priority
        return b

    async def start(self, rid: str, max_tokens: int, *, priority: int = 0, chat: bool = False) -> Stream:
        body = await self.body(rid, max_tokens, priority=priority, chat=chat)
        return await self.start_body(rid, body, chat=chat)

    async def start_body(self, rid: str, body: dict[str, Any], *, chat: bool = False) -> Stream:
        st = Stream(rid, body.get("max_tokens") or 0)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        st.resp = await self.s.post(self.url + path, json=body)
        if st.resp.status != 200:
            text = await st.resp.text()
            st.resp.release()
            raise AssertionError(f"POST {path} -> {st.resp.status}: {text[:300]}")
        st.task = asyncio.get_running_loop().create_task(st._read())
        self.streams.append(st)
        return st

    async def post_raw(self, path: str, data: bytes | str | None = None, json: Any = None
                       ) -> tuple[int, Any, Any]:
        kw: dict[str, Any] = {"json": json} if json is not None else {
            "data": data, "headers": {"Content-Type": "application/json"}}
        async with self.s.post(self.url + path, **kw) as r:
            raw = await r.read()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw
            return r.status, body, r.headers

    async def state(self) -> dict[str, Any]:
        async with self.s.get(self.url + control_api.STATE_PATH) as r:
            assert r.status == 200
            assert r.headers.get(control_api.VERSION_HEADER) == control_api.VERSION
            return await r.json()

    async def req(self, rid: str) -> dict[str, Any] | None:
        for r in (await self.state())["requests"]:
            if r["id"] == rid:
                return r
        return None

    async def commands(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        status, body, _ = await self.post_raw(control_api.COMMANDS_PATH, json={"commands": cmds})
        assert status == 200, body
        assert len(body["results"]) == len(cmds)
        return body["results"]

    async def command(self, op: str, rid: str, **extra: Any) -> dict[str, Any]:
        (res,) = await self.commands([{"op": op, "id": rid, **extra}])
        return res

    async def wait_status(self, rid: str, statuses: set[str] | str, timeout: float = TIMEOUT) -> dict[str, Any]:
        return (await self.wait_state(rid, statuses, timeout))[1]

    async def wait_state(self, rid: str, statuses: set[str] | str, timeout: float = TIMEOUT, *, tokens: int = 0
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first state in which ``rid`` has one of ``statuses`` (and ``tokens`` output tokens or more): (the
        whole state, the request in it)."""
        want = {statuses} if isinstance(statuses, str) else statuses
        last: list[str] = []  # the status seen last, for the failure message

        async def ok() -> tuple[dict[str, Any], dict[str, Any]] | None:
            st = await self.state()
            r = next((r for r in st["requests"] if r["id"] == rid), None)
            last[:] = [f"{r['status']}, {r['output_tokens']} tokens" if r is not None else "absent"]
            return (st, r) if r is not None and r["status"] in want and r["output_tokens"] >= tokens else None

        try:
            return await poll(ok, timeout, f"{rid} in {sorted(want)}" + (f" with {tokens} tokens" if tokens else ""))
        except AssertionError as e:
            raise AssertionError(f"{e} (last seen: {last[0] if last else 'never polled'}; {self.stream_of(rid)})"
                                 ) from None

    def stream_of(self, rid: str) -> str:
        """What this client's stream of ``rid`` saw, for failure messages: an absent request may have finished."""
        st = next((s for s in self.streams if s.rid == rid), None)
        if st is None:
            return "no stream"
        return (f"stream: {st.count} of {st.max_tokens} tokens, finish_reason {st.finish_reason}, "
                f"{'ended' if st.done else 'open'}, error {st.error!r}")

    async def wait_running(self, rid: str, tokens: int = 1, timeout: float = TIMEOUT
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first state in which the engine runs ``rid`` with ``tokens`` output tokens or more.

        The engine's word, not the stream's: a loaded client reads behind a fast engine, so a request whose
        stream shows its first tokens may already be done in the engine. A test that acts on a request
        mid-stream waits here, then acts at once, on a request long enough not to finish in between."""
        return await self.wait_state(rid, "running", timeout, tokens=tokens)

    async def wait_gone(self, rid: str, timeout: float = TIMEOUT) -> float:
        """Seconds until ``rid`` leaves the state."""
        t0 = time.monotonic()

        async def gone() -> bool:
            return await self.req(rid) is None

        await poll(gone, timeout, f"{rid} to leave the state", interval=0.002)
        return time.monotonic() - t0

    async def wait_drained(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait until no request is live and no KV is used; return that state."""

        async def drained() -> dict[str, Any] | None:
            st = await self.state()
            e = st["engine"]
            if st["requests"] or e["kv_device_used_tokens"] or e["kv_host_used_tokens"]:
                return None
            return st

        return await poll(drained, timeout, "the engine to drain (no requests, no KV used)")

    async def close_streams(self) -> None:
        for st in self.streams:
            st.disconnect()
        for st in self.streams:
            if st.task is not None:
                try:
                    await st.task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the test's outcome is already decided
                    pass
