"""A client's malformed request (an over-long header line) gets 400 and costs one warning line without a
traceback, rate-limited: no client can flood the logs."""

from __future__ import annotations

import asyncio
import logging

from gateway.logs import ProtocolErrorFilter


async def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection after a protocol error
    writer.close()
    return data


async def test_over_long_header_lines_are_logged_once_each_without_traceback_and_rate_limited(
        gateway, http, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    for f in logging.getLogger("aiohttp.server").filters:  # process-wide: start from a fresh window
        if isinstance(f, ProtocolErrorFilter):
            f.reset()
    n = 30
    for header in ("Authorization: Bearer ", "X-TokenFlow-Rate: ", "Last-Event-ID: ") * (n // 3):
        req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{header}{'a' * 10000}\r\n"
               "Content-Length: 2\r\n\r\n{}").encode()
        answer = await _raw(gateway.url, req)
        assert answer.split(b" ", 2)[1] == b"400", answer[:100]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    burst = ProtocolErrorFilter().burst
    print(f"\n{n} over-long headers: {len(records)} log lines (burst {burst})")
    assert 1 <= len(records) <= burst
    assert all(r.levelno == logging.WARNING and r.exc_info is None and r.getMessage() == "client protocol error"
               for r in records)
    assert all(r.error == "LineTooLong" for r in records)  # type: ignore[attr-defined]
    assert not [r for r in records if "aaaa" in str(r.__dict__)], "a header's value (a bearer token) is never logged"
    async with http.get(gateway.url + "/v1/models") as r:  # the gateway serves on
        assert r.status == 200


def test_the_filter_reports_what_it_suppressed() -> None:
    from aiohttp.http_exceptions import LineTooLong

    t = [0.0]
    f = ProtocolErrorFilter(burst=2, window_s=10.0, clock=lambda: t[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                 ("1.2.3.4",), (LineTooLong, LineTooLong("header", "8190"), None))

    assert [f.filter(record()) for _ in range(5)] == [True, True, False, False, False]
    t[0] = 10.0
    r = record()
    assert f.filter(r) and r.suppressed == 3 and r.remote == "1.2.3.4"  # type: ignore[attr-defined]
    bug = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", (),
                            (ValueError, ValueError("a bug"), None))
    assert f.filter(bug) and bug.levelno == logging.ERROR and bug.exc_info is not None  # real failures untouched
