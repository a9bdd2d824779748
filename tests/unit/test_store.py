"""Session store: ids, resubmission bodies, the memory store, and the Redis store against a real Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest
import redis

from gateway.config import SessionConfig
from gateway.resume import NotResumable, continuation_body, parse_event_id
from gateway.state import Final, StoreUnavailable, StreamRecord, valid_id
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore

REDIS_URL = os.environ.get("TOKENFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def rec(sid: str, kind: str = "completion", body: dict | None = None) -> StreamRecord:
    return StreamRecord(sid, "sim", "m", kind, 10.0, "smooth", True, False, 50, 1700000000, arrival_wall=time.time(),
                        body=body or {"model": "m", "prompt": "hello", "max_tokens": 50})


async def until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not await pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.01)


# ----- ids and resubmission -----

def test_event_ids_parse_and_reject() -> None:
    assert parse_event_id("abc123:17") == ("abc123", 17)
    assert parse_event_id(" a.b-c_d:0 ") == ("a.b-c_d", 0)
    for bad in ("abc", ":5", "abc:", "abc:-1", "abc:1e3", "abc:" + "9" * 20):
        with pytest.raises(ValueError):
            parse_event_id(bad)


def test_key_ids_are_validated() -> None:
    assert valid_id("Ab-1._x") == "Ab-1._x"
    for bad in ("", "a:b", "a*", "a b", "x" * 129, "a\nb", "{a}"):
        with pytest.raises(ValueError):
            valid_id(bad)


def test_continuation_of_a_completion_appends_the_output_and_shrinks_the_limit() -> None:
    body = {"model": "m", "prompt": "Once", "max_tokens": 10, "temperature": 0}
    out = continuation_body("completion", body, [(2, " upon a", None), (3, " time", None)])
    assert out == {"model": "m", "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0}
    assert body["prompt"] == "Once"  # the record is not modified
    assert continuation_body("completion", {"prompt": ["Once"]}, [(1, " more", None)])["prompt"] == ["Once more"]
    assert continuation_body("completion", body, []) == body
    assert continuation_body("completion", body, [(10, "x" * 10, None)]) is None  # nothing left to generate
    ids = continuation_body("completion", {"prompt": [1, 2], "max_tokens": 5}, [(2, "ab", [7, 8])])
    assert ids == {"prompt": [1, 2, 7, 8], "max_tokens": 3}
    with pytest.raises(NotResumable):
        continuation_body("completion", {"prompt": [1, 2]}, [(1, "a", None)])


def test_continuation_of_a_chat_continues_an_assistant_message() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    out = continuation_body("chat", {"messages": msgs, "max_completion_tokens": 9}, [(4, " tok0 tok1 tok2 tok3", None)])
    assert out["messages"] == [*msgs, {"role": "assistant", "content": " tok0 tok1 tok2 tok3"}]
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    assert out["max_completion_tokens"] == 5
    again = continuation_body("chat", out, [(1, " tok4", None)])  # a second resubmission extends the same message
    assert again["messages"][-1]["content"] == " tok0 tok1 tok2 tok3 tok4" and len(again["messages"]) == 2


# ----- memory store -----

async def test_memory_store_keeps_tokens_and_releases_for_resumption() -> None:
    store = MemoryStore(SessionConfig(ttl_s=0.2), ["sim"])
    got: list = []
    store.sink = lambda sid, deltas, final: got.append((sid, deltas, final))
    store.create(rec("s1"))
    store.append("s1", (1, " a", None))
    store.append("s1", (3, " bc", None))
    assert got == [("s1", [(1, " a", None)], None), ("s1", [(3, " bc", None)], None)]  # delivered at once
    loaded = await store.load("s1")
    assert loaded is not None and loaded.tokens == 3 and loaded.state == "running" and loaded.owner == store.replica_id
    assert not await store.claim("s1"), "a running stream has an owner"
    store.release("s1")
    assert (await store.load("s1")).state == "detached"
    assert await store.claim("s1") and not await store.claim("s1")
    store.finish("s1", Final("stop", 4))
    loaded = await store.load("s1")
    assert loaded.state == "finished" and loaded.final == Final("stop", 4)

    async def expired() -> bool:
        return await store.load("s1") is None

    await until(expired, what="record expiry after ttl")
    assert await store.load("nope") is None


# ----- Redis store -----

def _cfg(prefix: str, **kw) -> SessionConfig:
    base = dict(store="redis", redis_url=REDIS_URL, key_prefix=prefix, lease_ttl_s=0.6, scan_interval_s=0.2,
                driver_lease_ttl_s=0.6, tick_interval_s=0.1, flush_interval_s=0.005, op_timeout_s=0.5)
    return SessionConfig(**{**base, **kw})


@pytest.fixture
def prefix():
    try:
        r = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
        r.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    p = "test" + uuid.uuid4().hex[:10]
    yield p
    keys = list(r.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.mark.redis
async def test_redis_tokens_reach_the_client_once_durable_and_any_replica_loads_them(prefix: str) -> None:
    a = RedisStore(_cfg(prefix, replica_id="A"), ["sim"])
    b = RedisStore(_cfg(prefix, replica_id="B"), ["sim"])
    got: list = []
    a.sink = lambda sid, deltas, final: got.append((deltas, final))
    await a.start()
    await b.start()
    try:
        a.create(rec("s1"))
        for i in range(1, 11):
            a.append("s1", (i, f" tok{i - 1}", None))
        a.finish("s1", Final("length", 3))

        async def delivered() -> bool:
            return any(f is not None for _, f in got)

        await until(delivered, what="durable delivery")
        assert [d for ds, _ in got for d in ds] == [(i, f" tok{i - 1}", None) for i in range(1, 11)]
        loaded = await b.load("s1")
        assert loaded.state == "finished" and loaded.final == Final("length", 3) and loaded.owner is None
        assert [d[0] for d in loaded.deltas] == list(range(1, 11))
        assert a.roundtrips < 10, "writes are batched"
        r = redis.Redis.from_url(REDIS_URL)
        # both expire after the end
        assert 0 < r.pttl(f"{prefix}:s:s1") <= 600_000 and 0 < r.pttl(f"{prefix}:t:s1") <= 600_000
        assert all(k.decode().startswith(prefix + ":") for k in r.scan_iter(match=f"{prefix}*"))
        assert await b.load("unknown") is None
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_redis_failing_while_a_write_is_in_flight_loses_no_token(prefix: str) -> None:
    """Another pipeline fails (the store turns degraded) while a write of queued tokens has not answered yet:
    the tokens that come next are served from memory at once, and those in flight must reach the stream
    before them, not be skipped. (Seen as lost tokens when Redis came back and a stale pooled connection
    failed one pipeline while the flush's was in flight.)"""
    a = RedisStore(_cfg(prefix, replica_id="A"), ["sim"])
    got: list = []
    a.sink = lambda sid, deltas, final: got.append((list(deltas), final))
    await a._load_scripts()  # no background loops: this test drives the flushes
    try:
        a.create(rec("s1"))
        await a._flush()  # the record, and a live connection for the next pipeline
        for i in range(1, 4):
            a.append("s1", (i, f" tok{i - 1}", None))
        flush = asyncio.ensure_future(a._flush())
        await asyncio.sleep(0)  # its pipeline is sent; the answer comes with the next loop turns
        assert not flush.done() and got == []
        a._fail(ConnectionError("another pipeline failed"))
        a.append("s1", (4, " tok3", None))  # degraded: served from memory now
        a.finish("s1", Final("length", 1))
        await flush
        await a._flush()  # Redis answers again: what is left is written
        deltas = [d for ds, _ in got for d in ds]
        assert deltas == [(i, f" tok{i - 1}", None) for i in range(1, 5)]  # each once, in order
        assert [f for _, f in got if f is not None] == [Final("length", 1)] and got[-1][1] is not None
        loaded = await a.load("s1")
        assert loaded is not None and [d[0] for d in loaded.deltas] == [1, 2, 3, 4]
    finally:
        await a.close()


@pytest.mark.redis
async def test_redis_expired_owner_is_fenced_off_after_a_takeover(prefix: str) -> None:
    a = RedisStore(_cfg(prefix, replica_id="A"), ["sim"])
    b = RedisStore(_cfg(prefix, replica_id="B"), ["sim"])
    lost: list[str] = []
    claimed: list[str] = []
    a.on_lost = lost.extend
    b.on_claimed = claimed.extend
    await a._load_scripts()  # A writes but never renews: as if it hung
    a._ok()
    await b.start()
    try:
        a.create(rec("s2"))
        a.append("s2", (2, " x y", None))
        await a._flush()
        assert (await b.load("s2")).owner == "A"

        async def taken() -> bool:
            return "s2" in claimed

        await until(taken, what="B takes over the expired stream")
        assert (await b.load("s2")).owner == "B"
        a.append("s2", (3, " z", None))  # A wakes up and writes: refused
        await a._flush()
        assert lost == ["s2"]
        assert [d[0] for d in (await b.load("s2")).deltas] == [2]
        b.create(rec("s2"), [(2, " x y", None)])
        b.append("s2", (3, " w", None))
        b.finish("s2", Final("stop", 1))

        async def finished() -> bool:
            return (await b.load("s2")).state == "finished"

        await until(finished, what="B finishes the stream")
        assert [d[1] for d in (await b.load("s2")).deltas] == [" x y", " w"]
    finally:
        await a.redis.aclose()
        await b.close()


@pytest.mark.redis
async def test_redis_one_driver_per_engine_and_a_quick_handover(prefix: str) -> None:
    a = RedisStore(_cfg(prefix, replica_id="A"), ["e1", "e2"])
    b = RedisStore(_cfg(prefix, replica_id="B"), ["e1", "e2"])
    await a.start()

    async def a_drives() -> bool:
        return a.is_driver("e1") and a.is_driver("e2")

    await until(a_drives, what="A drives")
    await b.start()
    await asyncio.sleep(0.3)  # several ticks of both: B must never drive while A holds the lease
    assert not b.is_driver("e1") and not b.is_driver("e2")
    await a.close()  # a clean shutdown hands the leases over at once
    t0 = time.monotonic()

    async def b_drives() -> bool:
        return b.is_driver("e1") and b.is_driver("e2")

    await until(b_drives, what="B drives")
    assert time.monotonic() - t0 < 2.0
    await b.close()


@pytest.mark.redis
async def test_redis_published_streams_reach_the_driver(prefix: str) -> None:
    from gateway.state import PublishedStream

    a = RedisStore(_cfg(prefix, replica_id="A"), ["sim"])
    b = RedisStore(_cfg(prefix, replica_id="B"), ["sim"])
    now_wall = time.time()
    b.publisher = lambda: {"sim": [PublishedStream("r1", now_wall - 2, 100, 10.0, 40, now_wall - 1, 25.0, True)]}
    await a.start()
    await b.start()
    try:
        async def seen() -> bool:
            return bool(list(a.remote_streams("sim", 100.0)))

        await until(seen, what="A sees B's stream")
        (r,) = a.remote_streams("sim", 100.0)
        assert (r.id, r.generated_tokens, r.rate, r.attached) == ("r1", 40, 10.0, True)
        assert 97.0 < r.arrival_time < 99.0  # wall time mapped onto the local clock
        assert 0.0 <= r.buffer_tokens(100.0) <= 25.0
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_redis_close_returns_even_when_a_redis_call_swallows_the_cancel(prefix: str) -> None:
    # On Python 3.11 a cancel that lands while an inner timeout fires can be lost (the task sees a timeout
    # instead); the store's loops must still stop, and close() must never wait for them forever.
    store = RedisStore(_cfg(prefix, replica_id="A"), ["sim"])
    entered = asyncio.Event()

    async def tick_that_swallows_cancel() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # lost, as a timed-out redis-py call would lose it

    store._tick = tick_that_swallows_cancel  # type: ignore[method-assign]
    await store.start()
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(store.close(), 10)
    assert all(t.done() for t in store._tasks)


async def test_redis_unreachable_degrades_without_hanging() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    store = RedisStore(_cfg("down", redis_url=f"redis://127.0.0.1:{port}/0", replica_id="A"), ["sim"])
    got: list = []
    store.sink = lambda sid, deltas, final: got.append((deltas, final))
    t0 = time.monotonic()
    await store.start()
    try:
        assert store.degraded and store.status()["status"] == "degraded"
        store.create(rec("s3"))
        store.append("s3", (1, " a", None))
        store.finish("s3", Final("stop", 1))
        assert got == [([(1, " a", None)], None), ([], Final("stop", 1))], "served from memory at once"
        with pytest.raises(StoreUnavailable):
            await store.load("s3")
        assert not store.is_driver("sim")
    finally:
        await store.close()
    assert time.monotonic() - t0 < 5


@pytest.mark.redis
async def test_redis_password_from_config(tmp_path) -> None:
    import shutil
    import subprocess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--requirepass", "s3cret"], stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"

        async def up() -> bool:
            try:
                return bool(redis.Redis.from_url(url, password="s3cret", socket_timeout=0.2).ping())
            except redis.RedisError:
                return False

        await until(up, what="redis-server start")
        good = RedisStore(_cfg("pw", redis_url=url, redis_password="s3cret", replica_id="A"), ["sim"])
        bad = RedisStore(_cfg("pw", redis_url=url, redis_password="wrong", replica_id="B"), ["sim"])
        await good.start()
        await bad.start()
        try:
            good.create(rec("s4"))
            good.append("s4", (1, " a", None))
            good.finish("s4", Final("stop", 1))

            async def stored() -> bool:
                ld = await good.load("s4")
                return ld is not None and ld.state == "finished"

            await until(stored, what="write with the password")
            assert not good.degraded and bad.degraded
        finally:
            await good.close()
            await bad.close()
    finally:
        proc.kill()
        proc.wait(5)


async def test_memory_store_is_bounded() -> None:
    store = MemoryStore(SessionConfig(max_records=3), ["sim"])
    for i in range(3):
        store.create(rec(f"s{i}"))
    store.finish("s1", Final("stop", 1))
    store.create(rec("s3"))  # over the bound: the ended record goes, running ones stay
    assert [await store.load(f"s{i}") is not None for i in range(4)] == [True, False, True, True]


@pytest.mark.redis
async def test_redis_tls_with_a_private_ca(tmp_path) -> None:
    import shutil
    import subprocess

    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("redis-server or openssl is not installed")

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
       "-subj", "/CN=tokenflow-test-ca")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
       "-subj", "/CN=127.0.0.1")
    sh("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "srv.crt", "-days", "1", "-extfile", "san.ext")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", "srv.crt", "--tls-key-file", "srv.key", "--tls-ca-cert-file", "ca.crt",
                             "--tls-auth-clients", "no", "--save", ""], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        cfg = _cfg("tls", redis_url=f"rediss://127.0.0.1:{port}/0", redis_tls_ca_file=str(tmp_path / "ca.crt"),
                   replica_id="A")

        async def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await until(up, what="redis-server (TLS) start")
        store = RedisStore(cfg, ["sim"])
        untrusted = RedisStore(_cfg("tls", redis_url=f"rediss://127.0.0.1:{port}/0", replica_id="B"), ["sim"])
        await store.start()
        await untrusted.start()
        try:
            store.create(rec("s5"))
            store.finish("s5", Final("stop", 1))

            async def stored() -> bool:
                ld = await store.load("s5")
                return ld is not None and ld.state == "finished"

            await until(stored, what="write over TLS")
            assert not store.degraded
            assert untrusted.degraded, "a server certificate from an unknown CA is refused"
        finally:
            await store.close()
            await untrusted.close()
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.redis
async def test_redis_load_after_a_redis_restart_does_not_fail_on_a_stale_connection(tmp_path) -> None:
    """A client resumes right after Redis restarted: the pooled connections the server closed must not turn its
    resume into a 503."""
    from tests.integration.replicas import RedisServer

    srv = RedisServer(tmp_path)
    srv.start()
    store = RedisStore(_cfg("stale", redis_url=srv.url, replica_id="A", tick_interval_s=10.0,
                                 lease_ttl_s=20.0, driver_lease_ttl_s=20.0), ["sim"])
    await store.start()
    try:
        # Several pooled connections, as concurrent resumes leave behind.
        assert await asyncio.gather(*(store.load(f"x{i}") for i in range(4))) == [None] * 4
        srv.stop()
        srv.start()
        assert await store.load("x0") is None
        assert not store.degraded
    finally:
        await store.close()
        srv.stop()


@pytest.mark.redis
async def test_redis_reset_rewrites_a_quiet_running_stream_at_once(tmp_path) -> None:
    """Redis restarts empty while a stream writes nothing (reading ahead, or held by the policy): the owner writes
    it again as soon as it reconnects, so a client that leaves right after can still resume it elsewhere."""
    from tests.integration.replicas import RedisServer

    srv = RedisServer(tmp_path)
    srv.start()
    # Lease renewal (which would also find the record gone) every 5 s: out of the way of what is tested here.
    cfg = _cfg("reset", redis_url=srv.url, replica_id="A", tick_interval_s=5.0, lease_ttl_s=10.0,
               driver_lease_ttl_s=10.0, retry_interval_s=0.05)
    store = RedisStore(cfg, ["sim"])
    log_ = [(i, f" tok{i - 1}", None) for i in range(1, 6)]
    store.local_log = lambda sid: list(log_) if sid == "s1" else None  # type: ignore[method-assign]
    got: list = []
    store.sink = lambda sid, deltas, final: got.append(deltas)
    resets: list[int] = []
    store.on_reset = lambda: resets.append(1)  # type: ignore[method-assign]
    await store.start()
    try:
        store.create(rec("s1"))
        store.extend("s1", log_)

        async def durable() -> bool:
            return sum(len(d) for d in got) == 5

        await until(durable, what="durable")
        srv.stop()
        srv.start()  # empty: every key is gone

        async def reconnected() -> bool:
            return bool(resets)

        await until(reconnected, what="the reset noticed")
        store.local_log = lambda sid: None  # type: ignore[method-assign]  # the client left: the stream is gone here
        store.release("s1")
        r = redis.Redis.from_url(srv.url)

        async def written() -> bool:
            return r.hget("reset:s:s1", "state") == b"detached"

        await until(written, what="the record written again, then detached")
        loaded = await store.load("s1")
        assert loaded is not None and [d[0] for d in loaded.deltas] == [1, 2, 3, 4, 5]
    finally:
        await store.close()
        srv.stop()
