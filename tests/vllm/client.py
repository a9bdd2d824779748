"""A small client for the vLLM tests: streaming completions with chosen prompts and control calls."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.contract.client import poll as _poll

TIMEOUT = 60.0  # generous: a shared, loaded 2-core machine
# A whole answer of several hundred tokens, several at once: on a 2-core machine loaded by other work the tiny
# model's CPU engine has run at a few tokens/s per stream. A bound against hangs, not a speed check.
ANSWER_TIMEOUT = 300.0


async def poll(pred: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """The contract suite's poll, with this suite's longer default deadline."""
    return await _poll(pred, timeout, what, interval=0.005)


class Gen:
    """One streaming /v1/completions request; token ids are collected by a background task."""

    def __init__(self, client: Client, rid: str | None, prompt: str | list[int], max_tokens: int, **extra: Any):
        self.c, self.rid, self.max_tokens = client, rid, max_tokens
        self.body = {
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **extra,
        }  # fmt: skip
        if rid is not None:
            self.body["vllm_xargs"] = {"tokenflow_id": rid}
        self.tokens: list[int] = []
        self.arrivals: list[float] = []  # perf_counter() at each token
        self.finish_reason: str | None = None
        self.task: asyncio.Task | None = None
        self.resp: aiohttp.ClientResponse | None = None

    async def start(self) -> Gen:
        self.resp = await self.c.s.post(self.c.url + "/v1/completions", json=self.body)
        assert self.resp.status == 200, await self.resp.text()
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.resp.content:
            # A line already buffered is returned without a pass through the event loop: once this reader falls
            # behind a fast engine it would read the whole answer before the test's control calls got a turn,
            # and the request would be over before the test could preempt it.
            await asyncio.sleep(0)
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                ids = ch.get("token_ids") or []
                now = time.perf_counter()
                self.tokens.extend(ids)
                self.arrivals.extend([now] * len(ids))
                if ch.get("finish_reason"):
                    self.finish_reason = ch["finish_reason"]

    async def wait_tokens(self, n: int) -> None:
        async def ok() -> bool:
            assert not (self.task.done() and len(self.tokens) < n), f"{self.rid} ended at {len(self.tokens)} < {n}"
            return len(self.tokens) >= n

        await poll(ok, what=f"{n} tokens of {self.rid}")

    async def done(self) -> list[int]:
        await asyncio.wait_for(self.task, ANSWER_TIMEOUT)
        return self.tokens

    def disconnect(self) -> None:
        self.resp.close()
        self.task.cancel()


class Client:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.s = url, session

    async def gen(self, rid: str | None, prompt: str | list[int], max_tokens: int, **extra: Any) -> Gen:
        """A started stream; with ``rid``, returned once the engine lists the request (or its answer has ended):
        vLLM's server sends the response's headers before the engine has taken the request in, and a state read
        in between would not find it."""
        g = await Gen(self, rid, prompt, max_tokens, **extra).start()
        if rid is not None:

            async def known() -> bool:
                return g.task.done() or await self.req(rid) is not None

            await poll(known, what=f"the engine to list {rid}")
        return g

    async def run(self, prompt: str | list[int], max_tokens: int, **extra: Any) -> list[int]:
        """An uninterrupted reference run."""
        return await (await self.gen(None, prompt, max_tokens, **extra)).done()

    async def commands(self, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.s.post(self.url + "/control/v1/commands", json={"commands": list(cmds)}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["results"]

    async def cmd(self, op: str, rid: str, **kw: Any) -> dict[str, Any]:
        (res,) = await self.commands({"op": op, "id": rid, **kw})
        assert res["ok"], res
        return res

    async def state(self) -> dict[str, Any]:
        async with self.s.get(self.url + "/control/v1/state") as r:
            assert r.status == 200
            return await r.json()

    async def req(self, rid: str) -> dict[str, Any] | None:
        return next((r for r in (await self.state())["requests"] if r["id"] == rid), None)

    async def counters(self) -> dict[str, int]:
        return (await self.state())["engine"]["counters"]

    async def wait_status(self, rid: str, *statuses: str) -> dict[str, Any]:
        async def ok():
            r = await self.req(rid)
            return r if r is not None and r["status"] in statuses else None

        return await poll(ok, what=f"{rid} in {statuses}")

    async def wait_idle(self) -> dict[str, Any]:
        async def ok():
            st = await self.state()
            e = st["engine"]
            idle = not st["requests"] and not e["kv_device_used_tokens"] and not e["kv_host_used_tokens"]
            return st if idle else None

        return await poll(ok, what="no live request and no KV in use")
