"""Processes for the replica tests: a simulated engine, gateway replicas and private Redis servers, each a real
subprocess on a free port, plus an SSE client that resumes with Last-Event-ID like a browser's EventSource."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.support.procs import Proc, free_port, poll

__all__ = ["Client", "Cluster", "Proc", "RedisServer", "free_port", "poll", "readyz"]

_TOK = re.compile(r" tok(\d+)")


class RedisServer:
    """A private redis-server (no persistence: a restart loses every key, the hardest case)."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.logdir = logdir
        self.proc: Proc | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = Proc(f"redis-{self.port}-{time.monotonic_ns()}", [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            self.logdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill(signal.SIGKILL)
            self.proc = None


@dataclass
class Cluster:
    logdir: Path
    redis_url: str
    prefix: str = field(default_factory=lambda: "t" + uuid.uuid4().hex[:10])
    engine_url: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    async def start_engine(self, name: str = "engine") -> str:
        """A simulated engine (sim-small); the first one's URL is also ``engine_url``."""
        port = free_port()
        self.procs[name] = Proc(name, [sys.executable, "-m", "backends.sim", "--profile", "sim-small",
                                       "--port", str(port)], self.logdir)
        url = f"http://127.0.0.1:{port}"
        self.engine_url = self.engine_url or url
        async with aiohttp.ClientSession() as http:
            async def up() -> bool:
                async with http.get(url + "/health") as r:
                    return r.status == 200
            await poll(up, 30, "engine start")
        return url

    async def start_gateway(self, name: str, policy: str = "fcfs", *, engine: dict[str, Any] | None = None,
                            env_extra: dict[str, str] | None = None, **session: Any) -> str:
        """A replica on a free port; ``engine``: more options of its engine entry, ``env_extra``: more
        ``TOKENFLOW_*`` variables."""
        port = free_port()
        env = {
            "TOKENFLOW_ENGINES": orjson.dumps([{"name": "sim", "url": self.engine_url, **(engine or {})}]).decode(),
            "TOKENFLOW_SERVER__LOG_LEVEL": "warning",
            "TOKENFLOW_SCHEDULER__POLICY": policy,
            "TOKENFLOW_SCHEDULER__TICK_INTERVAL_S": "0.1",
            "TOKENFLOW_SESSION__STORE": "redis",
            "TOKENFLOW_SESSION__REDIS_URL": self.redis_url,
            "TOKENFLOW_SESSION__KEY_PREFIX": self.prefix,
            "TOKENFLOW_SESSION__REPLICA_ID": name,
            "TOKENFLOW_SESSION__LEASE_TTL_S": "2.0",
            "TOKENFLOW_SESSION__SCAN_INTERVAL_S": "0.5",
            "TOKENFLOW_SESSION__DRIVER_LEASE_TTL_S": "2.0",
            "TOKENFLOW_SESSION__TICK_INTERVAL_S": "0.25",
            "TOKENFLOW_SESSION__OP_TIMEOUT_S": "0.5",
            **{f"TOKENFLOW_SESSION__{k.upper()}": str(v) for k, v in session.items()},
            **(env_extra or {}),
        }
        self.procs[name] = Proc(name, [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(port)], self.logdir, env={**os.environ, **env})
        url = self.urls[name] = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                async with http.get(url + "/readyz") as r:
                    return r.status == 200
            try:
                await poll(ready, 60, f"gateway {name} start")
            except AssertionError:
                raise AssertionError(f"gateway {name} did not start:\n{self.procs[name].tail()}") from None
        return url

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()


async def readyz(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
        return await r.json()


@dataclass
class Client:
    """One streaming client: reads SSE, remembers the last event id, resumes elsewhere when cut off."""

    body: dict[str, Any]
    path: str = "/v1/completions"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. the API key
    texts: list[str] = field(default_factory=list)
    last_id: str | None = None
    sid: str | None = None
    done: bool = False
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    error_codes: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None  # the last usage chunk (stream_options.include_usage)
    stamps: list[float] = field(default_factory=list)  # monotonic arrival time of each text chunk

    async def read(self, resp: aiohttp.ClientResponse, stop_after: int | None = None) -> None:
        """Consume events until [DONE] (sets done), the connection ends, or ``stop_after`` tokens."""
        self.sid = self.sid or resp.headers.get("X-TokenFlow-Stream-Id")
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"id:"):
                self.last_id = line[3:].strip().decode()
            elif line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    return
                obj = orjson.loads(payload)
                if "error" in obj:
                    self.errors.append(obj["error"]["message"])
                    self.error_codes.append(str(obj["error"].get("code")))
                    continue
                if obj.get("usage"):
                    self.usage = obj["usage"]
                for c in obj.get("choices") or ():
                    t = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                    if t:
                        self.texts.append(t)
                        self.stamps.append(time.monotonic())
                    if c.get("finish_reason"):
                        self.finish_reasons.append(c["finish_reason"])
                if stop_after is not None and len(self.tokens()) >= stop_after:
                    return

    async def start(self, http: aiohttp.ClientSession, url: str, stop_after: int | None = None) -> None:
        try:
            async with http.post(url + self.path, json=self.body, headers=self.headers) as resp:
                assert resp.status == 200, await resp.text()
                await self.read(resp, stop_after)
        except (TimeoutError, aiohttp.ClientError) as e:
            self.errors.append(f"cut: {type(e).__name__}")

    async def resume(self, http: aiohttp.ClientSession, url: str, via: str) -> None:
        """Reconnect with Last-Event-ID: re-POST the request (``post``) or GET the events endpoint (``get``)."""
        assert self.last_id and self.sid
        self.reconnects += 1
        headers = {**self.headers, "Last-Event-ID": self.last_id}
        if via == "post":
            ctx = http.post(url + self.path, json=self.body, headers=headers)
        else:
            ctx = http.get(f"{url}/v1/streams/{self.sid}/events", headers=headers)
        async with ctx as resp:
            assert resp.status == 200, await resp.text()
            await self.read(resp)

    def tokens(self) -> list[int]:
        return [int(m) for m in _TOK.findall("".join(self.texts))]


def lost_and_duplicated(clients: list[Client], expected: int) -> tuple[int, int, int]:
    """(lost, duplicated, out of order) over every client, against `` tok0 .. tok<expected-1>``."""
    lost = dup = disorder = 0
    for c in clients:
        toks = c.tokens()
        seen = set(toks)
        lost += len(set(range(expected)) - seen)
        dup += len(toks) - len(seen)
        disorder += sum(1 for a, b in zip(toks, toks[1:]) if b <= a)
    return lost, dup, disorder
