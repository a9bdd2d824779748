"""Only the API key that started a stream may resume it, or see its live state (an admin key sees all)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from .replicas import Client, Cluster, RedisServer, lost_and_duplicated, poll

ALICE = "sk-alice-resume-0123456789"
BOB = "sk-bob-resume-9876543210"
OPS = "sk-ops-resume-5555555555"


@pytest.fixture
def gateway_config():
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05,
            "auth.keys": [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]}


async def test_another_key_cannot_resume_a_stream(gateway, http) -> None:
    alice = {"Authorization": f"Bearer {ALICE}"}
    body = {"model": "sim-small", "prompt": "p", "stream": True, "max_tokens": 30, "tokenflow": {"pacing": "none"}}
    c = Client(body)
    async with http.post(gateway.url + c.path, json=body, headers=alice) as resp:
        assert resp.status == 200
        await c.read(resp, stop_after=5)
    for who in (BOB,):
        async with http.get(f"{gateway.url}/v1/streams/{c.sid}/events?after=5",
                            headers={"Authorization": f"Bearer {who}"}) as r:
            assert r.status == 404
    async with http.get(f"{gateway.url}/v1/streams/{c.sid}/events", headers={**alice, "Last-Event-ID": c.last_id}) as r:
        assert r.status == 200
        await c.read(r)
    assert c.done and lost_and_duplicated([c], 30) == (0, 0, 0)


async def test_stream_state_is_scoped_to_its_key_on_every_replica(tmp_path) -> None:
    """Two replicas sharing Redis: alice's stream, started on A and resumed on B, is listed and shown to alice
    (and the admin key) on the replica that holds it, and to bob on neither."""
    srv = RedisServer(tmp_path)
    srv.start()
    cluster = Cluster(tmp_path, srv.url)
    keys = [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}, {"name": "ops", "key": OPS, "admin": True}]
    env = {"TOKENFLOW_AUTH__KEYS": json.dumps(keys)}
    try:
        await cluster.start_engine()
        a = await cluster.start_gateway("A", env_extra=env)
        b = await cluster.start_gateway("B", env_extra=env)
        body = {"model": "sim-small", "prompt": "p", "stream": True, "max_tokens": 60, "tokenflow": {"rate": 20}}
        c = Client(body, headers={"Authorization": f"Bearer {ALICE}"})

        async def seen(http: aiohttp.ClientSession, url: str, key: str) -> tuple[set[str], int]:
            auth = {"Authorization": f"Bearer {key}"}
            async with http.get(url + "/v1/streams", headers=auth) as r:
                ids = {s["id"] for s in (await r.json())["data"]}
            async with http.get(f"{url}/v1/streams/{c.sid}", headers=auth) as r:
                return ids, r.status

        async with aiohttp.ClientSession() as http:
            async with http.post(a + c.path, json=body, headers=c.headers) as resp:
                assert resp.status == 200
                await c.read(resp, stop_after=3)
                on_a = {k: await seen(http, a, k) for k in (ALICE, BOB, OPS)}
            resumed = asyncio.create_task(c.resume(http, b, "get"))  # alice goes on reading on B

            async def on_b() -> bool:
                return c.sid in (await seen(http, b, OPS))[0]

            await poll(on_b, 10, "the stream live on B")
            on_b_seen = {k: await seen(http, b, k) for k in (ALICE, BOB, OPS)}
            await asyncio.wait_for(resumed, 30)
        assert on_a[ALICE] == ({c.sid}, 200) and on_a[OPS] == ({c.sid}, 200)
        assert on_a[BOB] == (set(), 404)
        assert on_b_seen[ALICE] == ({c.sid}, 200) and on_b_seen[OPS] == ({c.sid}, 200)
        assert on_b_seen[BOB] == (set(), 404)
        assert c.done and lost_and_duplicated([c], 60) == (0, 0, 0)
    finally:
        cluster.stop()
        srv.stop()
