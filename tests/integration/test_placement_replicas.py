"""Placement across replicas: a replica that does not drive an engine places with the summary the driver
published through Redis. Real processes: two simulated engines, two gateway replicas, the shared Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis

from .replicas import Cluster, poll, readyz
from .test_replicas import SHARED_REDIS, _redis_available

pytestmark = pytest.mark.redis


@pytest.fixture
async def two_engines(tmp_path: Path) -> AsyncIterator[tuple[Cluster, str, str]]:
    if not _redis_available(SHARED_REDIS):
        pytest.skip(f"no Redis at {SHARED_REDIS}")
    c = Cluster(tmp_path, SHARED_REDIS)
    try:
        e0 = await c.start_engine("engine-0")
        e1 = await c.start_engine("engine-1")
        yield c, e0, e1
    finally:
        c.stop()
        r = redis.Redis.from_url(SHARED_REDIS)
        keys = list(r.scan_iter(match=f"{c.prefix}:*", count=1000))
        if keys:
            r.delete(*keys)


async def _occupy(http: aiohttp.ClientSession, engine_url: str, started: asyncio.Event) -> None:
    """A request straight to the engine (no gateway stream counts it): 3,000 prompt tokens of its device KV."""
    body = {"model": "sim-small", "prompt": [7] * 3000, "max_tokens": 1000, "stream": True}
    async with http.post(engine_url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for _ in r.content:
            started.set()


async def test_replica_that_is_not_the_driver_places_with_the_published_summary(
        two_engines: tuple[Cluster, str, str]) -> None:
    cluster, e0, e1 = two_engines
    engines = orjson.dumps([{"name": "e0", "url": e0}, {"name": "e1", "url": e1}]).decode()
    env = {"TOKENFLOW_ENGINES": engines, "TOKENFLOW_PLACEMENT__STRATEGY": "kv-free-first"}
    a = await cluster.start_gateway("a", env_extra=env)
    async with aiohttp.ClientSession() as http:
        async def a_drives() -> bool:
            return (await readyz(http, a))["session"]["drivers"] == {"e0": True, "e1": True}
        await poll(a_drives, 15, "replica a drives both engines")
        b = await cluster.start_gateway("b", env_extra=env)
        assert (await readyz(http, b))["session"]["drivers"] == {"e0": False, "e1": False}

        started = asyncio.Event()
        load = asyncio.create_task(_occupy(http, e0, started))
        try:
            await asyncio.wait_for(started.wait(), 15)

            # B holds no stream on either engine: by its own counts they are equal and the first (e0) would win.
            async def b_sees_e0_loaded() -> bool:
                s = (await readyz(http, b))["session"]["summaries"]
                return ("e0" in s and "e1" in s and s["e0"]["kv_blocks_free"] < s["e0"]["kv_blocks_total"]
                        and s["e1"]["kv_blocks_free"] == s["e1"]["kv_blocks_total"])
            await poll(b_sees_e0_loaded, 15, "replica b reads the driver's summary of e0 under load")
            assert (await readyz(http, b))["session"]["drivers"] == {"e0": False, "e1": False}

            body = {"model": "sim-small", "prompt": "hello", "max_tokens": 40, "stream": True, "rate": 4}
            async with http.post(b + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                sid = r.headers["X-TokenFlow-Stream-Id"]
                async with http.get(f"{b}/v1/streams/{sid}") as info:
                    assert info.status == 200
                    assert (await info.json())["engine"] == "e1"
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await load
