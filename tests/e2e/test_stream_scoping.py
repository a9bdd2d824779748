"""Live stream state is private to the API key that started the stream; an admin key sees every stream."""

from __future__ import annotations

import asyncio

import pytest

ALICE, BOB, OPS = "sk-alice-scope-0123456789", "sk-bob-scope-9876543210", "sk-ops-scope-5555555555"


@pytest.fixture
def gateway_config():
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05,
            "auth.keys": [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB},
                          {"name": "ops", "key": OPS, "admin": True}]}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _ids(http, url: str, key: str) -> set[str]:
    async with http.get(url + "/v1/streams", headers=_auth(key)) as r:
        assert r.status == 200
        return {s["id"] for s in (await r.json())["data"]}


async def _get(http, url: str, sid: str, key: str) -> tuple[int, dict]:
    async with http.get(f"{url}/v1/streams/{sid}", headers=_auth(key)) as r:
        return r.status, await r.json()


async def test_streams_are_listed_and_shown_only_to_their_key_and_admins(gateway, http) -> None:
    url = gateway.url
    body = {"model": "sim-small", "prompt": "p", "stream": True, "max_tokens": 200, "tokenflow": {"rate": 2}}
    async with http.post(url + "/v1/completions", json=body, headers=_auth(ALICE)) as a, \
            http.post(url + "/v1/completions", json=body, headers=_auth(BOB)) as b:
        assert a.status == b.status == 200
        alice, bob = a.headers["X-TokenFlow-Stream-Id"], b.headers["X-TokenFlow-Stream-Id"]
        await asyncio.gather(a.content.readline(), b.content.readline())  # both are live
        assert await _ids(http, url, ALICE) == {alice}
        assert await _ids(http, url, BOB) == {bob}
        assert await _ids(http, url, OPS) == {alice, bob}
        status, err = await _get(http, url, alice, BOB)
        # The same answer as for an unknown id, in OpenAI's format: ids cannot be probed across keys.
        assert status == 404 and err["error"]["code"] == "not_found"
        unknown_status, unknown = await _get(http, url, "0" * 24, BOB)
        assert (unknown_status, unknown["error"]["code"]) == (404, "not_found")
        assert (await _get(http, url, alice, ALICE))[0] == 200
        status, info = await _get(http, url, bob, OPS)
        assert status == 200 and info["id"] == bob
        # An admin key sees the state, not the answer: it cannot read another key's events.
        async with http.get(f"{url}/v1/streams/{alice}/events?after=0", headers=_auth(OPS)) as r:
            assert r.status == 404
