"""An engine's streaming response, read by an asyncio protocol rather than an HTTP client's stream reader.

Every token of every stream crosses this path, so it is kept to one callback per network read: the protocol
decodes the HTTP/1.1 framing (chunked, Content-Length or close-delimited) and the SSE lines of whatever bytes
arrived, and hands the deltas to the consumer synchronously (``consume``), without a task wake-up, a stream
reader buffer or a coroutine per read. On this path a general HTTP client cost about 21 µs of CPU per token
and this protocol about 8 (bench: 500 streams at 50 tokens/s each, one core).

One connection per engine request (``Connection: close``): a stream lasts seconds to minutes, so a connection
set-up is small next to its tokens, and aborting a request is closing its connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from .sse_parse import Delta, EngineError, parse_lines

_SIZE, _DATA, _CRLF = 0, 1, 2


class EngineStream(asyncio.Protocol):
    """One streaming request to an engine: its response head, then deltas as they arrive."""

    def __init__(self, engine: str, kind: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.kind = kind
        self._chat = kind == "chat"
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.error_body = b""  # a non-200 answer's body
        self._head = b""
        self._head_done = False
        self._mode = "close"  # chunked | length | close
        self._remaining = 0
        self._cstate = _SIZE
        self._cbuf = b""
        self._rest = b""
        self._body_done = False
        self._finished = False
        self._on_batch: Callable[[list[Delta]], None] | None = None
        self._pending: list[list[Delta]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._head_fut: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] = loop.create_future()
        self._done.add_done_callback(_retrieve)
        self._head_fut.add_done_callback(_retrieve)
        self._timer: asyncio.TimerHandle | None = None

    # ----- client side -----
    @classmethod
    async def open(cls, engine: str, base_url: str, path: str, kind: str, body: bytes, headers: dict[str, str],
                   timeout_s: float, connect_timeout_s: float = 10.0) -> "EngineStream":
        """Connect, send the request and wait for the response head (a non-200 answer's whole body)."""
        u = urlsplit(base_url)
        host = u.hostname or "127.0.0.1"
        port = u.port or (443 if u.scheme == "https" else 80)
        ctx = ssl.create_default_context() if u.scheme == "https" else None
        loop = asyncio.get_running_loop()
        proto = cls(engine, kind, loop)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, host, port, ssl=ctx), connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            raise EngineError(f"engine '{engine}' is unreachable: {e!r}", status=503) from e
        hosthdr = f"[{host}]" if ":" in host else host
        lines = [f"POST {u.path.rstrip('/')}{path} HTTP/1.1", f"Host: {hosthdr}:{port}", "Connection: close",
                 "Accept: text/event-stream", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        assert proto.transport is not None
        proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        proto._timer = loop.call_later(timeout_s, proto._fail, asyncio.TimeoutError())
        try:
            await proto._head_fut
        except BaseException:
            proto.close()
            raise
        return proto

    async def consume(self, on_batch: Callable[[list[Delta]], None]) -> None:
        """Hand every batch of deltas (one per network read) to ``on_batch`` as it arrives, until the stream ends.

        Raises EngineError (bad or broken stream, an error event) or asyncio.TimeoutError (the request timeout).
        ``on_batch`` runs inside the protocol callback: it must not block; what it raises ends the stream.
        """
        pending, self._pending = self._pending, []
        for b in pending:
            on_batch(b)
        self._on_batch = on_batch
        await self._done

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """The batches as an async iterator (simple consumers; the data path uses :meth:`consume`)."""
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            if self._done.done():
                self._done.result()  # raises the stream's error, if any
                return
            self._waiter = self._loop.create_future()
            await self._waiter

    def close(self) -> None:
        """Stop reading (aborting the engine request if it is still running)."""
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        if not self._done.done():
            self._done.set_result(None)
        self._wake()

    # ----- protocol -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._finished:
            return
        if self._head_done and self._mode == "close":
            self._end_of_body()
        else:
            what = "the response head" if not self._head_done else "the stream"
            self._fail(EngineError(f"engine '{self.engine}' closed the connection before the end of {what}"))

    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        try:
            if not self._head_done:
                data = self._parse_head(data)
                if not data or self._finished:
                    return
            self._feed_body(data)
        except EngineError as e:
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - the consumer's failure ends this stream, not the event loop
            self._fail(e)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides whether the body was complete

    # ----- parsing -----
    def _parse_head(self, data: bytes) -> bytes:
        buf = self._head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                raise EngineError(f"engine '{self.engine}' sent an oversized response head")
            self._head = buf
            return b""
        self._head = b""
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            raise EngineError(f"engine '{self.engine}' sent a malformed response") from None
        te, length = "", None
        for h in lines[1:]:
            k, _, v = h.partition(":")
            k = k.strip().lower()
            if k == "transfer-encoding":
                te = v.strip().lower()
            elif k == "content-length":
                try:
                    length = int(v.strip())
                except ValueError:
                    raise EngineError(f"engine '{self.engine}' sent a bad Content-Length") from None
        if "chunked" in te:
            self._mode = "chunked"
        elif length is not None:
            self._mode, self._remaining = "length", length
        self._head_done = True
        if self.status == 200 and not self._head_fut.done():
            self._head_fut.set_result(None)
        rest = buf[end + 4:]
        if self._mode == "length" and self._remaining == 0:
            self._end_of_body()
            return b""
        return rest

    def _feed_body(self, data: bytes) -> None:
        mode = self._mode
        if mode == "chunked":
            payload = self._dechunk(data)
        elif mode == "length":
            payload = data[:self._remaining]
            self._remaining -= len(payload)
            if self._remaining <= 0:
                self._body_done = True
        else:
            payload = data
        if payload:
            if self.status != 200:
                self.error_body += payload
            else:
                self._feed_sse(payload)
        if self._body_done and not self._finished:
            self._end_of_body()

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._cbuf + data if self._cbuf else data
        self._cbuf = b""
        n, pos = len(buf), 0
        out: list[bytes] = []
        while pos < n:
            st = self._cstate
            if st == _DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._cstate = _CRLF
            elif st == _CRLF:
                if n - pos < 2:
                    break
                pos += 2
                self._cstate = _SIZE
            else:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > 1024:
                        raise EngineError(f"engine '{self.engine}' sent a malformed chunk")
                    break
                try:
                    size = int(buf[pos:nl].split(b";", 1)[0], 16)
                except ValueError:
                    raise EngineError(f"engine '{self.engine}' sent a malformed chunk") from None
                pos = nl + 2
                if size == 0:
                    self._body_done = True
                    pos = n  # trailers, if any, are of no interest
                    break
                self._remaining, self._cstate = size, _DATA
        if pos < n:
            self._cbuf = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _feed_sse(self, payload: bytes) -> None:
        nl = payload.rfind(b"\n")
        if nl < 0:
            self._rest += payload
            return
        lines = (self._rest + payload[:nl] if self._rest else payload[:nl]).split(b"\n")
        self._rest = payload[nl + 1:]
        batch, done = parse_lines(lines, self._chat)
        if batch:
            self._deliver(batch)
        if done and not self._finished:
            self._finish()

    def _end_of_body(self) -> None:
        if self.status != 200:
            self._finished = True
            if not self._head_fut.done():
                self._head_fut.set_result(None)
            if self.transport is not None:
                self.transport.close()
            return
        if self._rest:
            batch, _ = parse_lines([self._rest], self._chat)
            self._rest = b""
            if batch:
                self._deliver(batch)
        if not self._finished:
            self._finish()

    def _deliver(self, batch: list[Delta]) -> None:
        cb = self._on_batch
        if cb is not None:
            cb(batch)
        else:
            self._pending.append(batch)
            self._wake()

    def _finish(self) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()
        if not self._done.done():
            self._done.set_result(None)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in (self._head_fut, self._done):
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._waiter = None


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    """Mark an exception as seen: a stream closed by its consumer need not be awaited."""
    if not fut.cancelled():
        fut.exception()
