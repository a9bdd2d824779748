"""Only the API key that started a stream may resume it."""

from __future__ import annotations

import pytest

from .replicas import Client, lost_and_duplicated

ALICE = "sk-alice-resume-0123456789"
BOB = "sk-bob-resume-9876543210"


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
