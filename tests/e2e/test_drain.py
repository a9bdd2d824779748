"""Measured drain end to end: a real gateway, real sockets, clients that read slower than they declared."""

from __future__ import annotations

import asyncio
import logging
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
        print(f"measured {measured['rate_measured']:.2f} tok/s vs true {true_rate} (client observed {observed:.2f}) "
              f"after {took:.1f} s")
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

    async def recorded() -> bool:  # at its end the stream's declared and measured rates are in the metrics
        async with http.get(f"{gateway.url}/metrics") as r:
            text = await r.text()
        return 'tokenflow_client_rate_tokens_per_second_count{engine="sim",kind="measured"} 1.0' in text
    await wait_for(recorded, timeout=10)
    async with http.get(f"{gateway.url}/metrics") as r:
        text = await r.text()
    assert 'tokenflow_client_rate_tokens_per_second_count{engine="sim",kind="declared"} 1.0' in text
    assert 'tokenflow_client_rate_measured_ratio_bucket{engine="sim",le="0.5"} 1.0' in text  # 5 of 20 declared


SLOW_ENGINE = """\
name: drain-test
description: two sequences at ~12 tokens/s each, so three 10 tok/s readers overload it
source: synthetic
model: {name: sim-small, kv_bytes_per_token: 8192, max_model_len: 4096}
step: {base_s: 0.08, per_token_s: 2.0e-5, per_kv_token_s: 2.0e-8}
batch: {max_num_seqs: 2, max_num_batched_tokens: 2048, block_size: 16}
kv: {device_tokens: 16384, host_tokens: 262144}
transfer: {h2d_bytes_per_s: 2.0e9, d2h_bytes_per_s: 2.0e9}
"""


@pytest.fixture
def slow_engine_config(tmp_path):
    p = tmp_path / "drain-test.yaml"
    p.write_text(SLOW_ENGINE)
    return {
        "server.port": 0, "scheduler.tick_interval_s": 0.1, "scheduler.policy": "tokenflow",
        "drain.sample_interval_s": 0.1, "engines": [{"name": "sim", "profile": str(p)}],
    }


async def read_all(http, gateway, body) -> tuple[list[int], float]:
    """Every event id of a streamed answer, and when its first token arrived (monotonic)."""
    ids: list[int] = []
    first = 0.0
    async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"id: "):
                ids.append(int(line.rsplit(b":", 1)[1]))
                first = first or time.monotonic()
    return ids, first


async def test_stalled_client_is_paused_and_resumes_without_loss(slow_engine_config, http):
    """A client stops reading for 10 s: reported stalled, held by the tokenflow policy so a waiting request
    runs, resumed when it reads again, and every token arrives."""
    from gateway.app import start_gateway
    from gateway.config import load_config

    # Stall-free admission (no stall budget): c is not let in at the readers' expense, so its first token shows
    # that pausing the stalled client is what freed the engine for it.
    cfg = dict(slow_engine_config, **{"scheduler.knobs": {"stall_budget_s": 0.0}})
    gw = await start_gateway(load_config(None, **cfg), port=0)
    try:
        model = sorted(gw.gateway.models)[0]

        def body(n: int) -> dict:
            return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "max_tokens": n, "tokenflow": {"rate": 10}}

        a = SlowClient(gw.url, body(100), rcvbuf=1024)
        await a.open()
        b = asyncio.create_task(read_all(http, gw, body(120)))
        await a.read_at(10, until=time.monotonic() + 1.0)  # reads normally at first
        c = asyncio.create_task(read_all(http, gw, body(60)))  # the engine is full: c waits
        stop = time.monotonic()
        st: dict = {}

        async def stalled_and_held() -> bool:
            nonlocal st
            st = await info(http, gw, a.stream_id)
            return st["stalled"] and st["engine_status"] == "held"

        await wait_for(stalled_and_held, timeout=9.0, interval=0.1)
        held_at = time.monotonic()
        detected = held_at - stop
        print(f"stalled and held {detected:.1f} s after the client stopped reading; rate {st['rate']}")
        assert st["rate_source"] == "stalled" and st["rate"] < 1
        # The gauges are exported once per full drain-sampler pass, which may end after the stream's own state
        # turned stalled: wait for the next export rather than race it.
        async def exported() -> bool:
            async with http.get(f"{gw.url}/metrics") as r:
                text = await r.text()
            return ('tokenflow_clients_stalled{engine="sim"} 1.0' in text
                    and 'tokenflow_client_stalls_total{engine="sim"} 1.0' in text)

        await wait_for(exported, timeout=5.0, interval=0.05)
        assert st["buffer_tokens"] >= st["generated_tokens"] - a.consumed - 12  # all it has not read, as buffered
        # The engine serves the others meanwhile: c, which had been waiting, gets all its tokens.
        await wait_for(lambda: _done(c), timeout=30)
        print(f"c done {time.monotonic() - stop:.1f} s after a stopped reading")
        # 10 s of not reading in all, then it reads again, faster than it declared, to the end.
        await asyncio.sleep(max(0.0, stop + 10.0 - time.monotonic()))
        t_read = time.monotonic()
        await wait_for(lambda: _running_again(http, gw, a), timeout=30, interval=0.05)
        t_resumed = time.monotonic()

        await a.read_at(1000, until=time.monotonic() + 60)
        print(f"resumed {t_resumed - t_read:.1f} s after reading again; "
              f"the rest took {time.monotonic() - t_resumed:.1f} s")
        assert a.done, "the stream finished"
        ids_c, c_first = c.result()
        ids_b, _ = await b
        print(f"c's first token {c_first - held_at:+.1f} s from a being held")
        assert c_first > stop + 2.0, "c waited for the engine until the stalled client was paused"
        assert ids_b == list(range(1, 121)) + [120] and ids_c == list(range(1, 61)) + [60]
        assert a.consumed == 100 and a.events == 100 + 2  # 100 token events, the finish event, [DONE]
    finally:
        a.close()
        await gw.close()


async def _done(task: asyncio.Task) -> bool:
    return task.done()


async def _running_again(http, gw, client: SlowClient) -> bool:
    await client.read_event()  # keeps reading while the gateway notices
    st = await info(http, gw, client.stream_id)
    return not st["stalled"] and (st["engine_status"] in ("running", "loading") or st["finished"])


async def test_undeclared_rate_is_learned_from_the_drain(gateway, http, model):
    """No declared rate: the default class to start with, then what the client really reads (4 tok/s)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 300}
    c = SlowClient(gateway.url, body, rcvbuf=1024)
    await c.open()
    reader = asyncio.create_task(c.read_at(4.0, until=time.monotonic() + 60))
    try:
        first = await info(http, gateway, c.stream_id)
        assert first["rate_declared"] is False and first["rate_declared_value"] is None
        assert first["rate"] == 8.0  # streams.default_rate

        async def learned() -> bool:
            st = await info(http, gateway, c.stream_id)
            return st["rate_source"] == "measured" and st["rate"] == pytest.approx(4.0, rel=0.2)

        took = await wait_for(learned, timeout=20, interval=0.1)
        print(f"undeclared client learned at 4 tok/s within 20% after {took:.1f} s")
    finally:
        reader.cancel()
        c.close()


async def test_the_log_and_metrics_say_why_a_new_request_is_held(slow_engine_config, http, caplog):
    """Three 10 tok/s readers on an engine that feeds two: the third waits out of the engine, and the operator sees
    why (a "tick" log line with the admission's limit, and the held-requests gauge), then it gets every token."""
    from gateway.app import start_gateway
    from gateway.config import load_config

    cfg = dict(slow_engine_config, **{"scheduler.knobs": {"stall_budget_s": 0.0}})
    gw = await start_gateway(load_config(None, **cfg), port=0)
    try:
        model = sorted(gw.gateway.models)[0]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 40, "tokenflow": {"rate": 10}}
        # One answer first, so the policy has measured the engine's decode steps (before any, it assumes a fast
        # engine and admits all three).
        await read_all(http, gw, dict(body, max_tokens=3))
        with caplog.at_level(logging.INFO, logger="tokenflow.control"):
            runs = [asyncio.create_task(read_all(http, gw, body)) for _ in range(3)]

            async def held_in_metrics() -> bool:
                async with http.get(f"{gw.url}/metrics") as r:
                    text = await r.text()
                return 'tokenflow_policy_held_new_requests{engine="sim",why="admission"} 1.0' in text

            await wait_for(held_in_metrics, timeout=10, interval=0.02)
            results = await asyncio.gather(*runs)
        assert all(ids == list(range(1, 41)) + [40] for ids, _ in results)  # nothing lost while held
        ticks = [r for r in caplog.records if r.getMessage() == "tick" and getattr(r, "held_new", 0)]
        assert ticks and {r.admit_limit for r in ticks} == {"capacity"}
        assert all(r.engine == "sim" and r.capacity_tps > 0 for r in ticks)
    finally:
        await gw.close()
