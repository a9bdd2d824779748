"""Several gateway replicas sharing Redis: a replica killed mid-stream loses no token and repeats none,
scheduling moves to a surviving replica, and a Redis outage fails no stream.

Real processes: one simulated engine, gateway replicas (``python -m gateway.cli serve``), Redis (the shared
server on 127.0.0.1:6379 with a per-test key prefix, or a private ``redis-server`` when the test stops it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis

from .replicas import Client, Cluster, RedisServer, lost_and_duplicated, poll, readyz

pytestmark = pytest.mark.redis

SHARED_REDIS = os.environ.get("TOKENFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STREAMS = 50


def _redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    if not _redis_available(SHARED_REDIS):
        pytest.skip(f"no Redis at {SHARED_REDIS}")
    c = Cluster(tmp_path, SHARED_REDIS)
    try:
        await c.start_engine()
        yield c
    finally:
        c.stop()
        r = redis.Redis.from_url(SHARED_REDIS)
        keys = list(r.scan_iter(match=f"{c.prefix}:*", count=1000))
        if keys:
            r.delete(*keys)


async def _has(c: Client, n: int) -> bool:
    return len(c.tokens()) >= n


def _bodies(n: int, max_tokens: int, rate: float) -> list[Client]:
    out = []
    for i in range(n):
        if i % 2:
            out.append(Client({"model": "sim-small", "messages": [{"role": "user", "content": f"question {i}"}],
                               "stream": True, "max_tokens": max_tokens, "tokenflow": {"rate": rate}},
                              path="/v1/chat/completions"))
        else:
            out.append(Client({"model": "sim-small", "prompt": f"prompt {i}", "stream": True, "max_tokens": max_tokens,
                               "tokenflow": {"rate": rate}}))
    return out


async def _kill_a_mid_stream(cluster: Cluster, a: str, b: str, max_tokens: int) -> list[Client]:
    """50 streams through A; SIGKILL A once every client has a few tokens; every client resumes on B."""
    clients = _bodies(STREAMS, max_tokens, rate=40)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30)) as http:
        tasks = [asyncio.create_task(c.start(http, a)) for c in clients]

        async def all_started() -> bool:
            return all(len(c.tokens()) >= 5 for c in clients)

        await poll(all_started, 60, "every stream delivering through replica A")
        cluster.procs["A"].kill(signal.SIGKILL)
        await asyncio.gather(*tasks)
        cut = [c for c in clients if not c.done]
        assert cut, "killing replica A mid-stream cut no stream"
        await asyncio.gather(*(c.resume(http, b, "post" if i % 2 else "get") for i, c in enumerate(cut)))
    return clients


async def test_replica_killed_mid_stream_resumes_on_another_with_nothing_lost(cluster: Cluster) -> None:
    a = await cluster.start_gateway("A")
    b = await cluster.start_gateway("B")
    max_tokens = 200
    t0 = time.monotonic()
    clients = await _kill_a_mid_stream(cluster, a, b, max_tokens)
    lost, dup, disorder = lost_and_duplicated(clients, max_tokens)
    resumed = sum(1 for c in clients if c.reconnects)
    async with aiohttp.ClientSession() as http:
        info = (await readyz(http, b))["session"]
    print(f"\n{STREAMS} streams, replica A killed, {resumed} resumed on B ({info['resumes']}, "
          f"takeovers {info['takeovers']}): lost = {lost}, duplicated = {dup}, out of order = {disorder} "
          f"({time.monotonic() - t0:.1f} s)")
    assert [c.errors for c in clients if [e for e in c.errors if not e.startswith("cut:")]] == []
    assert all(c.done for c in clients), "every stream finished with [DONE]"
    assert (lost, dup, disorder) == (0, 0, 0)
    assert all(len(c.tokens()) == max_tokens for c in clients)
    assert info["takeovers"] + info["resumes"]["resubmit"] > 0, "no stream needed its generation continued"


async def test_engine_driver_moves_to_surviving_replica(cluster: Cluster) -> None:
    a = await cluster.start_gateway("A", policy="tokenflow")
    async with aiohttp.ClientSession() as http:
        async def a_drives() -> bool:
            return (await readyz(http, a))["session"]["drivers"]["sim"] is True

        await poll(a_drives, 20, "replica A drives the engine")
        b = await cluster.start_gateway("B", policy="tokenflow")
        assert (await readyz(http, b))["session"]["drivers"]["sim"] is False, "two drivers for one engine"

        # B publishes its streams; the driver (A) schedules them too: start streams on B, see them in A's view.
        clients = _bodies(4, 400, rate=5)
        tasks = [asyncio.create_task(c.start(http, b)) for c in clients]

        async def a_sees_b_streams() -> bool:
            return all(c.tokens() for c in clients)

        await poll(a_sees_b_streams, 30, "streams on B")

        # While A lives and streams, a second connection on B follows A's token log (no second generation);
        # when A's own client leaves (A frees the engine), B continues the generation for its client.
        n = 400
        on_a = Client({"model": "sim-small", "prompt": "follow me", "stream": True, "max_tokens": n,
                       "tokenflow": {"rate": 100}})
        first = asyncio.create_task(on_a.start(http, a))
        await poll(lambda: _has(on_a, 3), 20, "stream on A")
        follower = Client(on_a.body, sid=on_a.sid, last_id=f"{on_a.sid}:0")
        second = asyncio.create_task(follower.resume(http, b, "get"))
        await poll(lambda: _has(follower, 20), 20, "follower on B")
        first.cancel()  # A's client goes away mid-stream
        await asyncio.gather(first, return_exceptions=True)
        await second
        assert follower.done and not on_a.done
        assert lost_and_duplicated([follower], n) == (0, 0, 0)
        session = (await readyz(http, b))["session"]
        assert session["resumes"]["follow"] == 1 and session["takeovers"] == 1

        killed_at = time.monotonic()
        cluster.procs["A"].kill(signal.SIGKILL)

        async def b_drives() -> bool:
            return (await readyz(http, b))["session"]["drivers"]["sim"] is True

        gap = await poll(b_drives, 20, "replica B drives the engine after A died", interval=0.02)
        gap = time.monotonic() - killed_at
        print(f"\nengine without a driver for {gap:.2f} s after the driving replica was SIGKILLed "
              f"(driver lease {2.0} s)")
        assert gap < 5.0
        # B's control loop really runs the policy now: it sees the engine and its own streams.
        async with http.get(b + "/metrics") as r:
            text = await r.text()
        assert 'tokenflow_engine_driver{engine="sim"} 1.0' in text
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_streams_survive_a_redis_outage_and_resume_works_after(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    srv.start()
    cluster = Cluster(tmp_path, srv.url)
    try:
        await cluster.start_engine()
        a = await cluster.start_gateway("A")
        b = await cluster.start_gateway("B")
        max_tokens = 300
        clients = _bodies(STREAMS, max_tokens, rate=20)  # ~15 s of reading each: spans the outage
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120, sock_read=30)) as http:
            tasks = [asyncio.create_task(c.start(http, a)) for c in clients]

            async def started() -> bool:
                return all(len(c.tokens()) >= 3 for c in clients)

            await poll(started, 60, "streams started")
            srv.stop()
            down_at = time.monotonic()

            async def degraded() -> bool:
                return (await readyz(http, a))["status"] == "degraded"

            await poll(degraded, 10, "replica A reports degraded mode")
            async with http.get(a + "/metrics") as r:
                assert "tokenflow_session_store_degraded 1.0" in await r.text()
            # New streams are served during the outage too.
            during = _bodies(5, 40, rate=200)
            await asyncio.gather(*(c.start(http, a) for c in during))
            assert all(c.done for c in during)
            assert lost_and_duplicated(during, 40) == (0, 0, 0)
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))  # the outage lasts 10 s
            srv.start()

            async def healthy() -> bool:
                return (await readyz(http, a))["status"] == "ready"

            back = await poll(healthy, 15, "replica A leaves degraded mode")
            # Cut five running streams now and resume them on B: their state was written again after the restart.
            cut = [c for c in clients if not c.done][:5]
            assert len(cut) == 5, "the streams ended before Redis came back; lengthen them"
            for c in cut:
                tasks[clients.index(c)].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            rest = [c for c in clients if c not in cut]
            assert all(c.done for c in rest), [c.errors for c in rest if not c.done]

            async def written_again() -> bool:
                r = redis.Redis.from_url(srv.url)
                return all(r.exists(f"{cluster.prefix}:s:{c.sid}") for c in cut)

            try:
                await poll(written_again, 10, "records written again after the restart")
            except AssertionError:
                r = redis.Redis.from_url(srv.url)
                raise AssertionError(f"missing: {[c.sid for c in cut if not r.exists(f'{cluster.prefix}:s:{c.sid}')]}; "
                                     f"keys: {sorted(k.decode() for k in r.keys('*'))[:20]}") from None
            await asyncio.gather(*(c.resume(http, b, "get") for c in cut))
        lost, dup, disorder = lost_and_duplicated(clients, max_tokens)
        print(f"\nRedis down 10 s during {STREAMS} streams: failed = {sum(1 for c in clients if not c.done)}, "
              f"lost = {lost}, duplicated = {dup}; store back {back:.1f} s after restart; 5 resumed on B after")
        assert all(c.done for c in clients)
        assert (lost, dup, disorder) == (0, 0, 0)
        assert not [c.errors for c in clients if [e for e in c.errors if not e.startswith("cut:")]]
    finally:
        cluster.stop()
        srv.stop()
