"""The engine stream protocol against a raw TCP server: every HTTP framing, split anywhere, errors and ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from gateway.engines.client import EngineClient, EngineError, EngineStream


def _ev(text: str, ids: list[int], finish: str | None = None) -> bytes:
    obj = {"choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE = _ev(" a", [1]) + _ev(" b", [2, 3]) + _ev("", [], "length") + b"data: [DONE]\n\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def chunked(body: bytes, size: int = 37) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


Server = Callable[[list[bytes], bool], "asyncio.Future[str]"]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[list[bytes], bool], asyncio.Future]]:
    servers: list[asyncio.AbstractServer] = []

    async def start(parts: list[bytes], close: bool = True) -> str:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            for p in parts:  # one write per part, with a pause so reads split where the parts do
                w.write(p)
                await w.drain()
                await asyncio.sleep(0.002)
            if close:
                w.close()
            else:
                await asyncio.sleep(30)

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()


async def _read(url: str, timeout_s: float = 10.0) -> list[tuple[str, int, str | None]]:
    up = await EngineStream.open("e", url, "/v1/completions", "completion", b"{}", {}, timeout_s)
    got: list[tuple[str, int, str | None]] = []
    await up.consume(lambda batch: got.extend((d.text, d.tokens, d.finish_reason) for d in batch))
    return got


EXPECTED = [(" a", 1, None), (" b", 2, None), ("", 0, "length")]


@pytest.mark.parametrize("cut", [1, 5, 17, 40, 100, 1000])
async def test_chunked_split_anywhere(serve, cut: int) -> None:  # type: ignore[no-untyped-def]
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SSE)
    url = await serve([raw[i:i + cut] for i in range(0, len(raw), cut)])
    assert await _read(url) == EXPECTED


async def test_content_length_and_close_delimited(serve) -> None:  # type: ignore[no-untyped-def]
    url = await serve([HEAD + b"Content-Length: %d\r\n\r\n" % len(SSE) + SSE], close=False)
    assert await _read(url) == EXPECTED  # ends at the length, with the connection still open
    body = SSE.replace(b"data: [DONE]\n\n", b"")
    url = await serve([HEAD + b"\r\n" + body[:50], body[50:]])
    assert await _read(url) == EXPECTED  # ends at EOF


async def test_error_answer_becomes_engine_error_with_its_message(serve) -> None:  # type: ignore[no-untyped-def]
    import aiohttp

    err = b'{"error":{"message":"prompt too long","code":"context_length"}}'
    url = await serve([b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(err) + err])
    async with aiohttp.ClientSession() as http:
        with pytest.raises(EngineError, match="prompt too long") as e:
            await EngineClient("e", url, http).open_stream("completion", {"stream": True})
    assert e.value.status == 400 and e.value.body == orjson.loads(err)


async def test_broken_stream_timeout_and_unreachable(serve) -> None:  # type: ignore[no-untyped-def]
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SSE)[:60]
    url = await serve([raw])  # closes mid-chunk
    with pytest.raises(EngineError, match="closed the connection"):
        await _read(url)
    url = await serve([HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(_ev(" a", [1]))[:-5]], close=False)
    with pytest.raises(asyncio.TimeoutError):
        await _read(url, timeout_s=0.3)
    with pytest.raises(EngineError) as e:
        await EngineStream.open("e", "http://127.0.0.1:9", "/v1/completions", "completion", b"{}", {}, 5)
    assert e.value.status == 503


async def test_batches_iterator_and_close_mid_stream(serve) -> None:  # type: ignore[no-untyped-def]
    raw = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SSE)
    url = await serve([raw])
    up = await EngineStream.open("e", url, "/v1/completions", "completion", b"{}", {}, 10)
    got = [(d.text, d.tokens, d.finish_reason) async for b in EngineClient.delta_batches(up, "completion") for d in b]
    assert got == EXPECTED
    url = await serve([HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(_ev(" a", [1]))[:-5]], close=False)
    up = await EngineStream.open("e", url, "/v1/completions", "completion", b"{}", {}, 10)
    task = asyncio.ensure_future(up.consume(lambda b: None))
    await asyncio.sleep(0.05)
    up.close()  # the consumer stops reading: consume returns
    await asyncio.wait_for(task, 5)


async def test_connections_are_reused_after_a_clean_end_and_stale_ones_replaced() -> None:
    from gateway.engines.stream import ConnectionPool

    conns: list[asyncio.StreamWriter] = []
    close_after_first = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await r.readexactly(n)
            w.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SSE))
            await w.drain()
            if close_after_first.is_set():  # the engine drops the idle connection after answering
                w.close()
                return

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = ConnectionPool(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
    try:
        for _ in range(3):
            up = await EngineStream.open("e", pool, "/v1/completions", "completion", b"{}", {}, 10)
            got: list[tuple[str, int, str | None]] = []
            await up.consume(lambda b, got=got: got.extend((d.text, d.tokens, d.finish_reason) for d in b))
            up.close()
            assert got == EXPECTED
            await asyncio.sleep(0.02)  # the chunked terminator arrives: the connection is pooled
        assert len(conns) == 1 and pool.reuses == 2
        close_after_first.set()
        up = await EngineStream.open("e", pool, "/v1/completions", "completion", b"{}", {}, 10)
        await up.consume(lambda b: None)
        await asyncio.sleep(0.05)  # the engine closed it after answering: it leaves the pool
        up = await EngineStream.open("e", pool, "/v1/completions", "completion", b"{}", {}, 10)
        await up.consume(lambda b: None)
        assert len(conns) == 2
    finally:
        pool.close()
        srv.close()


async def test_paused_reading_leaves_events_in_the_socket_to_come_in_one_read() -> None:
    """The read-ahead bound: while paused nothing is read; on resume, what the engine sent meanwhile arrives
    as one batch (one read), not one batch per event."""
    paused, written, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(_ev(" t0", [0]), 10_000)[:-5])
        await paused.wait()
        for i in range(1, 10):  # one write (one TCP segment) per event
            w.write(chunked(_ev(f" t{i}", [i]), 10_000)[:-5])
            await w.drain()
        written.set()
        await finish.wait()
        w.write(chunked(b"data: [DONE]\n\n", 10_000))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    batches: list[list[str]] = []
    all_in = asyncio.get_running_loop().create_future()
    up = await EngineStream.open("e", url, "/v1/completions", "completion", b"{}", {}, 10)

    def on_batch(batch: list) -> None:  # type: ignore[type-arg]
        batches.append([d.text for d in batch])
        if len(batches) == 1:
            up.pause_reading(True)
            paused.set()
        if sum(map(len, batches)) == 10 and not all_in.done():
            all_in.set_result(None)

    up.attach(on_batch)
    await asyncio.wait_for(written.wait(), 5)
    await asyncio.sleep(0.05)  # a chance for a read that must not happen while paused
    assert batches == [[" t0"]]
    up.pause_reading(False)
    await asyncio.wait_for(all_in, 5)
    assert batches == [[" t0"], [f" t{i}" for i in range(1, 10)]]  # nine events, one read
    finish.set()
    await asyncio.wait_for(up.wait(), 5)
    srv.close()
