"""Reported progress: a voice pipeline says what it has spoken; the gateway's buffer follows it exactly."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import wait_for


@pytest.fixture
def gateway_config():
    return {
        "server.port": 0, "scheduler.tick_interval_s": 0.05, "drain.sample_interval_s": 0.1,
        "auth.keys": [{"name": "web", "key": "sk-web"}, {"name": "other", "key": "sk-other"}],
    }


WEB = {"Authorization": "Bearer sk-web"}
OTHER = {"Authorization": "Bearer sk-other"}


async def state(http, gateway, sid: str) -> dict:
    async with http.get(f"{gateway.url}/v1/streams/{sid}", headers=WEB) as r:
        assert r.status == 200
        return await r.json()


async def report(http, gateway, sid: str, body, headers=WEB) -> tuple[int, dict]:
    async with http.post(f"{gateway.url}/v1/streams/{sid}/progress", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_tts_progress_reports_keep_the_buffer_exact(gateway, http, model):
    """A TTS consumer reads the SSE stream as fast as it comes (its socket says nothing about speech) and
    reports twice a second how many tokens it has spoken: 4 tok/s, though it declared 8."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200,
            "tokenflow": {"rate": 8}}
    async with http.post(gateway.url + "/v1/chat/completions", json=body, headers=WEB) as resp:
        assert resp.status == 200
        sid = resp.headers["X-TokenFlow-Stream-Id"]
        received = 0
        spoken = 0

        async def receive() -> None:
            nonlocal received
            async for line in resp.content:
                if line.startswith(b"id: "):
                    received = int(line.rsplit(b":", 1)[1])

        rx = asyncio.create_task(receive())
        await wait_for(lambda: _at_least(lambda: received, 1), timeout=10)
        t0 = asyncio.get_running_loop().time()
        for k in range(1, 11):
            # the synthesizer's own clock: it speaks 4 tok/s and reports every 0.5 s
            await asyncio.sleep(max(0.0, t0 + 0.5 * k - asyncio.get_running_loop().time()))
            spoken = min(received, 2 * k)
            status, out = await report(http, gateway, sid, {"consumed_tokens": spoken})
            assert status == 200, out
            assert out["consumed_tokens"] == spoken
            assert out["buffer_tokens"] == out["generated_tokens"] - spoken  # exact at the report
            st = await state(http, gateway, sid)
            # Right after the report the gateway's view is the report itself, give or take what the
            # client reads at its rate in the milliseconds since.
            assert st["generated_tokens"] - spoken - 1 <= st["buffer_tokens"] <= st["generated_tokens"] - spoken
            assert st["reported_tokens"] == spoken
        st = await state(http, gateway, sid)
        assert st["rate_source"] == "reported"
        assert st["rate_measured"] == pytest.approx(4.0, rel=0.1)
        assert st["rate"] == pytest.approx(4.0, rel=0.1)  # paced at what the user hears, not what was declared

        # Bad reports: 4xx in OpenAI's format, and the state is unchanged.
        for bad, code in (
            ({"consumed_tokens": spoken - 1}, "progress_backwards"),
            ({"consumed_tokens": 10_000}, "progress_beyond_delivered"),
            ({"consumed_tokens": "ten"}, "invalid_value"),
            ({"consumed_tokens": -1}, "invalid_value"),
            ({}, "invalid_value"),
        ):
            status, out = await report(http, gateway, sid, bad)
            assert status == 400, (bad, out)
            assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["code"] == code
        assert (await state(http, gateway, sid))["reported_tokens"] == spoken

        # Only the key that opened the stream may report on it; others cannot even see it exists.
        status, out = await report(http, gateway, sid, {"consumed_tokens": spoken}, headers=OTHER)
        assert status == 404 and out["error"]["code"] == "stream_not_found"
        status, out = await report(http, gateway, sid, {"consumed_tokens": spoken}, headers={})
        assert status == 401
        rx.cancel()

    status, out = await report(http, gateway, "no-such-stream", {"consumed_tokens": 1})
    assert status == 404 and out["error"]["code"] == "stream_not_found"


async def _at_least(get, n: int) -> bool:
    return get() >= n
