"""An engine's streaming response, read by an asyncio protocol rather than an HTTP client's stream reader.

Every token of every stream crosses this path, so it is kept to one callback per network read: the protocol
decodes the HTTP/1.1 framing (chunked, Content-Length or close-delimited) and the SSE lines of whatever bytes
arrived, and hands the deltas to the consumer synchronously (``consume``), without a task wake-up, a stream
reader buffer or a coroutine per read. On this path a general HTTP client cost about 21 µs of CPU per token
and this protocol about 8 (bench: 500 streams at 50 tokens/s each, one core).

Connections are kept alive and reused (:class:`ConnectionPool`, one per engine): thousands of streams a
minute to one engine would otherwise leave as many sockets in TIME_WAIT. A connection returns to the pool
only once its response ended cleanly (the chunked terminator or the whole Content-Length); a stream closed
by its consumer mid-response closes its connection, which is also how the engine learns the client left.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from .sse_parse import EngineDelta, EngineError, EngineTimeout, EngineUnreachable, parse_lines

_SIZE, _DATA, _CRLF = 0, 1, 2


# The kernel's receive buffer for an engine connection (Linux doubles it for its own bookkeeping). A paced stream
# stops reading its engine above its read-ahead bound; what the engine sends meanwhile waits here and comes in
# one read when reading restarts. Left to autotuning this grew to ~70 KB (about 250 chat chunks) per read, all of
# it parsed into the stream's token log at once: the bulk of the memory a reader who stopped reading cost
# (docs/operations.md). 4 KB still holds a dozen or more chunks, and at a token stream's few KB/s it does not
# limit throughput (a window of 4 KB carries MB/s even at a millisecond's round trip). The engine feels the
# backpressure sooner.
RECV_BUFFER = 4096


class _Stale(Exception):
    """A reused connection was closed by the engine before answering: retry on a fresh one."""


class _Conn(asyncio.Protocol):
    """One TCP connection to an engine; feeds the request it currently carries."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.req: EngineStream | None = None
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None:  # an idle connection must stay silent
            self.abort()
            return
        req._on_data(data)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides whether the response was complete

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._drop(self)
        req, self.req = self.req, None
        if req is not None:
            req._on_lost()

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        self.req = None
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """Idle keep-alive connections to one engine (most recently used first)."""

    def __init__(self, base_url: str, max_idle: int = 1024) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path.rstrip("/")
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self.opened = 0
        self.reuses = 0

    async def acquire(self, connect_timeout_s: float) -> _Conn:
        while self._idle:
            c = self._idle.pop()
            if c.alive():
                c.reused = True
                self.reuses += 1
                return c
        loop = asyncio.get_running_loop()
        c = _Conn(self)
        await asyncio.wait_for(loop.create_connection(lambda: c, self.host, self.port, ssl=self.ssl),
                               connect_timeout_s)
        self.opened += 1
        return c

    def release(self, c: _Conn) -> None:
        c.req = None
        if c.alive() and len(self._idle) < self.max_idle:
            c.transport.resume_reading()  # type: ignore[union-attr]  # its last stream may have paused it
            self._idle.append(c)
        else:
            c.abort()

    def _drop(self, c: _Conn) -> None:
        try:
            self._idle.remove(c)
        except ValueError:
            pass

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for c in idle:
            c.abort()


class EngineStream:
    """One streaming request to an engine: its response head, then deltas as they arrive."""

    # Slots: one per open engine request, ~35 attributes (an instance __dict__ costs ~1.6 KB).
    __slots__ = (
        "_body_done",
        "_cbuf",
        "_chat",
        "_conn",
        "_cstate",
        "_done",
        "_finished",
        "_got_bytes",
        "_head",
        "_head_done",
        "_head_fut",
        "_head_timer",
        "_keep_alive",
        "_loop",
        "_mode",
        "_on_batch",
        "_pending",
        "_remaining",
        "_rest",
        "_sse_done",
        "_timer",
        "_waiter",
        "_was_reused",
        "engine",
        "engine_preemptions",
        "error_body",
        "got_deltas",
        "kind",
        "last_data_at",
        "reading",
        "request_id",
        "running_since",
        "status",
    )

    def __init__(self, engine: str, kind: str, loop: asyncio.AbstractEventLoop, request_id: str | None = None) -> None:
        self.engine = engine
        self.request_id = request_id  # the gateway's id for the request (the control API's), when it has one
        # Activity, for the engine's liveness checks (gateway/engines/liveness.py): when bytes last came, whether
        # the gateway reads the connection now (read-ahead pauses it), whether any delta came yet.
        self.last_data_at = loop.time()
        self.reading = True
        self.got_deltas = False
        self.engine_preemptions = 0  # the engine's count for the request, and since when it runs without one more
        self.running_since = self.last_data_at
        self.kind = kind
        self._chat = kind == "chat"
        self._loop = loop
        self._conn: _Conn | None = None
        self.status = 0
        self.error_body = b""  # a non-200 answer's body
        self._got_bytes = False
        self._was_reused = False
        self._head = b""
        self._head_done = False
        self._keep_alive = True
        self._mode = "close"  # chunked | length | close
        self._remaining = 0
        self._cstate = _SIZE
        self._cbuf = b""
        self._rest = b""
        self._body_done = False
        self._sse_done = False  # [DONE] seen: the consumer is finished, the framing may still be arriving
        self._finished = False
        self._on_batch: Callable[[list[EngineDelta]], None] | None = None
        self._pending: list[list[EngineDelta]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._head_fut: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] = loop.create_future()
        self._done.add_done_callback(_retrieve)
        self._head_fut.add_done_callback(_retrieve)
        self._timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # ----- client side -----
    @classmethod
    async def open(cls, engine: str, pool: ConnectionPool | str, path: str, kind: str, body: bytes,
                   headers: dict[str, str], timeout_s: float, connect_timeout_s: float = 10.0,
                   head_timeout_s: float | None = None, request_id: str | None = None,
                   on_open: Callable[[EngineStream], None] | None = None) -> EngineStream:
        """Send the request (on a pooled connection when one is idle) and wait for the response head (a
        non-200 answer's whole body). ``pool`` may be a base URL (a one-off pool). EngineUnreachable when no
        connection is made within ``connect_timeout_s``; EngineTimeout when the head does not come within
        ``head_timeout_s`` (a frozen engine still accepts connections: its kernel does) or the whole request
        does not end within ``timeout_s``. ``on_open`` gets the stream as soon as its request is sent, before
        the head (so that it can be failed while it waits)."""
        if isinstance(pool, str):
            pool = ConnectionPool(pool, max_idle=0)
        hosthdr = f"[{pool.host}]" if ":" in pool.host else pool.host
        lines = [f"POST {pool.path}{path} HTTP/1.1", f"Host: {hosthdr}:{pool.port}", "Accept: text/event-stream",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        loop = asyncio.get_running_loop()
        for _ in range(3):  # a reused connection the engine closed meanwhile: try again on another
            try:
                conn = await pool.acquire(connect_timeout_s)
            except (TimeoutError, OSError) as e:
                raise EngineUnreachable(f"engine '{engine}' is unreachable: {e!r}") from e
            proto = cls(engine, kind, loop, request_id)
            proto._conn = conn
            proto._was_reused = conn.reused
            conn.req = proto
            assert conn.transport is not None
            conn.transport.write(request)
            if on_open is not None:
                on_open(proto)
            proto._timer = loop.call_later(
                timeout_s, proto._fail, EngineTimeout(f"engine '{engine}' did not finish within {timeout_s:g} s"))
            if head_timeout_s is not None and head_timeout_s < timeout_s:
                proto._head_timer = loop.call_later(head_timeout_s, proto._fail, EngineTimeout(
                    f"engine '{engine}' sent no response head within {head_timeout_s:g} s"))
            try:
                await proto._head_fut
            except _Stale:
                continue
            except BaseException:
                proto.close()
                raise
            return proto
        raise EngineUnreachable(f"engine '{engine}' closed every connection before answering")

    @property
    def ended(self) -> bool:
        """The stream ended (cleanly, in error, or closed by its consumer)."""
        return self._done.done()

    def fail(self, exc: EngineError) -> None:
        """End the stream with ``exc`` (the engine was judged down or stalled): its consumer's :meth:`wait`
        raises it, and the connection is closed."""
        self._fail(exc)

    def attach(self, on_batch: Callable[[list[EngineDelta]], None]) -> None:
        """Hand every batch of deltas (one per network read) to ``on_batch``: those already read now, the
        others as they arrive. ``on_batch`` runs inside the protocol callback: it must not block; what it
        raises ends the stream (:meth:`wait` raises it)."""
        pending, self._pending = self._pending, []
        try:
            for b in pending:
                on_batch(b)
        except Exception as e:  # noqa: BLE001 - the consumer's failure ends this stream only
            self._fail(e)
            return
        self._on_batch = on_batch

    async def wait(self) -> None:
        """Until the stream ends. Raises EngineError (bad or broken stream, an error event; EngineTimeout past
        the request timeout), or what the consumer raised."""
        await self._done

    async def consume(self, on_batch: Callable[[list[EngineDelta]], None]) -> None:
        """:meth:`attach`, then :meth:`wait`."""
        self.attach(on_batch)
        await self._done

    async def batches(self) -> AsyncIterator[list[EngineDelta]]:
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

    def pause_reading(self, paused: bool) -> None:
        """Stop (or restart) reading the connection: the engine's next events wait in the socket meanwhile,
        to come in one read. The consumer's read-ahead bound drives this (``gateway.streams.flow.ReadAhead``)."""
        conn = self._conn
        if conn is not None and conn.transport is not None and not self._finished:
            self.reading = not paused
            if paused:
                conn.transport.pause_reading()
            else:
                self.last_data_at = self._loop.time()  # silence while not reading says nothing of the engine
                conn.transport.resume_reading()

    def close(self) -> None:
        """The consumer is done. Mid-response this closes the connection (the engine sees its client leave);
        after the end of the events the connection finishes its framing and returns to the pool."""
        self._on_batch = None
        if not self._done.done():
            self._done.set_result(None)
        self._wake()
        if self._sse_done and not self._finished:
            return  # only the framing's tail is missing: _end_of_body pools the connection
        self._finished = True
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if conn is not None and conn.req is self:
            conn.abort()

    # ----- from the connection -----
    def _on_lost(self) -> None:
        self._conn = None
        if self._finished:
            return
        if self._head_done and self._mode == "close":
            self._keep_alive = False
            self._end_of_body()
        elif not self._got_bytes and self._was_reused:
            self._fail(_Stale())
        else:
            what = "the response head" if not self._head_done else "the stream"
            self._fail(EngineError(f"engine '{self.engine}' closed the connection before the end of {what}"))

    def _on_data(self, data: bytes) -> None:
        if self._finished:
            return
        self._got_bytes = True
        self.last_data_at = self._loop.time()
        try:
            if not self._head_done:
                data = self._parse_head(data)
                if not data or self._finished:
                    return
            self._feed_body(data)
        except Exception as e:  # noqa: BLE001 - a bad stream or the consumer's failure ends this stream only
            self._fail(e)

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
        self._keep_alive = parts[0] == "HTTP/1.1"
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
            elif k == "connection" and "close" in v.lower():
                self._keep_alive = False
        if "chunked" in te:
            self._mode = "chunked"
        elif length is not None:
            self._mode, self._remaining = "length", length
        else:
            self._keep_alive = False
        self._head_done = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
        if payload and not self._sse_done:
            if self.status != 200:
                self.error_body += payload
            else:
                self._feed_sse(payload)
        if self._body_done and not self._finished:
            self._end_of_body()

    def _dechunk(self, data: bytes) -> bytes:
        if not self._cbuf and self._cstate == _SIZE:  # the usual read: exactly one whole chunk (one event)
            nl = data.find(b"\r\n", 0, 10)
            if nl > 0 and data.endswith(b"\r\n"):
                try:
                    size = int(data[:nl], 16)
                except ValueError:  # chunk extensions and the like: the general parser below
                    size = 0
                if size > 0 and len(data) == nl + size + 4:
                    return data[nl + 2:nl + 2 + size]
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
                    if not buf.endswith(b"\r\n\r\n") and buf[pos:] != b"\r\n":
                        self._keep_alive = False  # trailers or a partial terminator: do not reuse
                    pos = n
                    break
                end = pos + size
                if end + 2 <= n:  # the whole chunk and its CRLF are here (several events per read): one step
                    out.append(buf[pos:end])
                    pos = end + 2
                    continue
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
        if done:
            self._sse_done = True  # the consumer is finished; the framing's end returns the connection
            self._rest = b""
            self._resolve()

    def _end_of_body(self) -> None:
        if self.status != 200:
            if not self._head_fut.done():
                self._head_fut.set_result(None)
        elif self._rest and not self._sse_done:
            batch, _ = parse_lines([self._rest], self._chat)
            self._rest = b""
            if batch:
                self._deliver(batch)
        self._finished = True
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if conn is not None and conn.req is self:
            if self._keep_alive:
                conn.pool.release(conn)
            else:
                conn.abort()
        self._resolve()

    def _deliver(self, batch: list[EngineDelta]) -> None:
        self.got_deltas = True
        cb = self._on_batch
        if cb is not None:
            cb(batch)
        else:
            self._pending.append(batch)
            self._wake()

    def _resolve(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        for fut in (self._head_fut, self._done):
            if not fut.done():
                fut.set_exception(exc)
        conn, self._conn = self._conn, None
        if conn is not None and conn.req is self:
            conn.abort()
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._waiter = None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an exception as seen: a stream closed by its consumer need not be awaited."""
    if not fut.cancelled():
        fut.exception()
