"""A raw-socket SSE client that reads deliberately slowly, with a small receive buffer.

It takes bytes from its socket only when it needs the next event, so unread data stays in the kernel and
the client's TCP stack closes its window: exactly what a slow human-paced reader does to a gateway.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

import orjson

_ID = re.compile(rb"^id: ([0-9a-f]+):(\d+)$", re.M)


class SlowClient:
    def __init__(self, url: str, body: dict, *, rcvbuf: int = 1024, headers: dict[str, str] | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.body = orjson.dumps(body)
        self.headers = headers or {}
        self.rcvbuf = rcvbuf
        self.sock: socket.socket | None = None
        self.buf = b""
        self.stream_id = ""
        self.consumed = 0  # token index of the last event read (from its id line)
        self.events = 0
        self.done = False
        self.event_bytes: list[int] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # before connect: sets the window
        s.setblocking(False)
        await loop.sock_connect(s, self.addr)
        self.sock = s
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        req = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.addr[0]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n{extra}\r\n"
        ).encode() + self.body
        await loop.sock_sendall(s, req)
        while b"\r\n\r\n" not in self.buf:
            await self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise AssertionError(f"gateway answered {status!r}")
        m = re.search(rb"X-TokenFlow-Stream-Id: (\w+)", head, re.I)
        assert m, head
        self.stream_id = m.group(1).decode()

    @property
    def actual_rcvbuf(self) -> int:
        assert self.sock is not None
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    async def _recv(self) -> None:
        assert self.sock is not None
        data = await asyncio.get_running_loop().sock_recv(self.sock, 256)
        if not data:
            raise ConnectionError("gateway closed the connection")
        self.buf += data

    async def read_event(self) -> None:
        """Take exactly one SSE event off the socket (reading only as many bytes as that needs)."""
        while b"\n\n" not in self.buf:
            await self._recv()
        ev, self.buf = self.buf.split(b"\n\n", 1)
        self.events += 1
        self.event_bytes.append(len(ev) + 2)
        if b"data: [DONE]" in ev:
            self.done = True
        m = _ID.search(ev)
        if m:
            self.consumed = int(m.group(2))

    async def read_at(self, rate: float, until: float) -> None:
        """Read one event every 1/rate seconds (on a fixed schedule) until ``until`` (monotonic) or the end."""
        t = time.monotonic()
        while not self.done and t < until:
            await self.read_event()
            t += 1.0 / rate
            await asyncio.sleep(max(0.0, t - time.monotonic()))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
