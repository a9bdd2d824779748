"""Measured drain end to end: a real gateway, real sockets, clients that read slower than they declared."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import wait_for
from tests.e2e.slow_client import SlowClient


@pytest.fixture
def gateway_config():
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05, "drain.sample_interval_s": 0.1}


async def info(http, gateway, sid: str) -> dict:
    async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
        assert r.status == 200
        return await r.json()


async def test_slow_reader_is_measured_at_its_true_rate(gateway, http, model):
    """Declares 20 tok/s, reads 5 tok/s with a small receive buffer: measured within 20% in a few seconds."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400,
            "tokenflow": {"rate": 20}}
    c = SlowClient(gateway.url, body, rcvbuf=1024)
    await c.open()
    true_rate = 5.0
    t0 = time.monotonic()
    reader = asyncio.create_task(c.read_at(true_rate, until=t0 + 60))
    try:
        sid = c.stream_id
        measured: dict = {}

        async def converged() -> bool:
            nonlocal measured
            measured = await info(http, gateway, sid)
            m = measured["rate_measured"]
            return m is not None and abs(m - true_rate) <= 0.2 * true_rate and time.monotonic() - t0 > 3

        took = await wait_for(converged, timeout=20, interval=0.1)
        elapsed = time.monotonic() - t0
        observed = c.events / elapsed  # what the client really read so far
        print(f"measured {measured['rate_measured']:.2f} tok/s vs true {true_rate} (client observed {observed:.2f}) after {took:.1f} s")
        assert took < 12, "a few seconds, not the whole answer"
        assert measured["rate_declared_value"] == 20
        assert measured["rate_source"] == "measured"
        # Pacing follows the evidence: never faster than the client drains.
        assert measured["rate"] == pytest.approx(measured["rate_measured"], rel=0.01)
        assert measured["rate"] < 0.8 * 20
        # Stays there, not just a lucky sample.
        for _ in range(10):
            await asyncio.sleep(0.3)
            m = (await info(http, gateway, sid))["rate_measured"]
            assert m == pytest.approx(true_rate, rel=0.2)
        # The gateway's buffer is what the client has not read, up to what sits in its receive buffer.
        st = await info(http, gateway, sid)
        unread = st["generated_tokens"] - c.consumed
        per_event = min(c.event_bytes[1:]) if len(c.event_bytes) > 1 else 200
        in_kernel = c.actual_rcvbuf // per_event + 2  # tokens the client's kernel may hold unread
        print(f"gateway buffer {st['buffer_tokens']} vs unread {unread} (receive buffer holds <= {in_kernel} events)")
        assert unread - in_kernel - 2 <= st["buffer_tokens"] <= unread + 2
        assert st["stalled"] is False
    finally:
        reader.cancel()
        c.close()
