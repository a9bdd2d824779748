"""A fast fake engine for relay benchmarks: OpenAI completions SSE at a fixed token rate, almost free per token.

It speaks what the gateway needs from an engine: ``POST /v1/completions`` (and ``/v1/chat/completions``)
streaming OpenAI chunks with ``token_ids``, ``GET /v1/models``, ``GET /control/v1/state`` (an empty, valid
state with ``X-TokenFlow-Control-Version: 1``) and ``POST /control/v1/commands`` (every command acknowledged).

Cost per token is one ``transport.write`` of a pre-encoded chunk: every stream shares the same bytes, and one
timer per process walks the streams. Streams are spread over ``1 / (rate * slot_s)`` phase slots; each tick
serves one slot, so tokens leave evenly rather than in one burst per period. The first token is written as
soon as the request is read (so direct TTFT is the network plus this parse), the rest at ``rate`` per stream.

Raw asyncio (uvloop when present), HTTP/1.1 keep-alive, chunked responses; enough HTTP for the gateway,
nginx and the benchmark's load generator, nothing more. One process serves about 60k tokens/s on a 2 GHz
core; ``--reuse-port`` lets several processes share one port (SO_REUSEPORT: the kernel spreads connections
over them), which is safe because nothing here is shared between requests (the control endpoints answer
the same every time).

    python -m bench.fast_upstream --port 9100 --rate 50
    python -m bench.fast_upstream --port 9100 --rate 50 --reuse-port   # once per process, same port
"""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

import orjson

_MODEL = "fast"


def _chunk(payload: bytes) -> bytes:
    """One HTTP chunk carrying one SSE event."""
    ev = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(ev), ev)


def _event(obj: dict[str, Any]) -> bytes:
    return _chunk(orjson.dumps(obj))


def _choice(chat: bool, text: str | None, ids: list[int], finish: str | None) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish, "token_ids": ids}


def _stream_bytes(chat: bool) -> tuple[bytes, bytes, bytes]:
    """(token chunk, tail for n tokens as a format string, ...): the bytes every stream of a kind shares."""
    head = {"id": "cmpl-fast", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": _MODEL}
    token = _event({**head, "choices": [_choice(chat, " tok", [42], None)]})
    finish = _event({**head, "choices": [_choice(chat, None if chat else "", [], "length")]})
    return token, finish, orjson.dumps(head)


_TOKEN = {k: _stream_bytes(k) for k in (False, True)}
_DONE = _chunk(b"[DONE]") + b"0\r\n\r\n"


def _tail(chat: bool, prompt: int, n: int) -> bytes:
    head = orjson.loads(_TOKEN[chat][2])
    usage = _event({**head, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                                    "total_tokens": prompt + n}})
    return _TOKEN[chat][1] + usage + _DONE


def _response(status: int, body: bytes, extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reason, len(body), extra, body))


_STATE = _response(200, orjson.dumps({
    "engine": {"name": "fast", "block_size": 16, "max_num_seqs": 1_000_000, "kv_bytes_per_token": 0,
               "kv_device_capacity_tokens": 0, "kv_device_used_tokens": 0, "kv_host_capacity_tokens": 0,
               "kv_host_used_tokens": 0, "counters": {}},
    "requests": [],
}), b"X-TokenFlow-Control-Version: 1\r\n")
_MODELS = _response(200, orjson.dumps({"object": "list",
                                       "data": [{"id": _MODEL, "object": "model", "owned_by": "bench"}]}))
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")


class _Gen:
    """One streaming response in progress."""

    __slots__ = ("alive", "conn", "left", "tail", "token")

    def __init__(self, conn: _Conn, n: int, token: bytes, tail: bytes) -> None:
        self.conn = conn
        self.left = n
        self.token = token
        self.tail = tail
        self.alive = True


class Upstream:
    """The shared generator: phase slots of streams, one timer."""

    def __init__(self, rate: float, slot_s: float = 0.002) -> None:
        self.rate = rate
        self.period = 1.0 / rate
        self.n_slots = max(1, round(self.period / slot_s))
        self.slot_s = self.period / self.n_slots
        self.slots: list[list[_Gen]] = [[] for _ in range(self.n_slots)]
        self.cur = 0
        self.streams = 0
        self.tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next = loop.time() + self.slot_s
        loop.call_at(self._next, self._tick)

    def add(self, g: _Gen) -> None:
        # The first token went out already; the next is one period later: the slot just served.
        self.slots[(self.cur - 1) % self.n_slots].append(g)
        self.streams += 1

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        slot = self.slots[self.cur]
        if slot:
            keep: list[_Gen] = []
            n = 0
            for g in slot:
                if not g.alive:
                    continue
                tr = g.conn.transport
                if g.left > 0:
                    tr.write(g.token)
                    g.left -= 1
                    n += 1
                    keep.append(g)
                else:
                    tr.write(g.tail)
                    g.alive = False
                    g.conn.gen = None
                    g.conn.resume()
            self.slots[self.cur] = keep
            self.tokens += n
        self.cur = (self.cur + 1) % self.n_slots
        self._next += self.slot_s
        now = loop.time()
        if self._next < now - 0.05:  # far behind (overload): do not burst to catch up
            self._next = now
        loop.call_at(self._next, self._tick)


class _Conn(asyncio.Protocol):
    __slots__ = ("buf", "gen", "transport", "up")

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.gen: _Gen | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.gen is not None:
            self.gen.alive = False
            self.gen = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.gen is None:
            self.resume()

    def resume(self) -> None:
        """Serve the requests waiting in the buffer (one stream at a time per connection)."""
        while self.gen is None and not self.transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            length = 0
            for h in lines[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        tr = self.transport
        if method == "GET" and path == "/control/v1/state":
            tr.write(_STATE)
        elif method == "GET" and path == "/v1/models":
            tr.write(_MODELS)
        elif method == "POST" and path == "/control/v1/commands":
            cmds = (orjson.loads(body) or {}).get("commands") or []
            res = [{"id": c.get("id"), "op": c.get("op"), "ok": True} for c in cmds]
            tr.write(_response(200, orjson.dumps({"results": res}), b"X-TokenFlow-Control-Version: 1\r\n"))
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            try:
                req = orjson.loads(body)
                n = int(req.get("max_tokens") or 16)
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                tr.write(_response(400, b'{"error":{"message":"bad body","type":"invalid_request_error"}}'))
                return
            chat = path.endswith("chat/completions")
            token = _TOKEN[chat][0]
            tr.write(_SSE_HEAD + token)  # the first token at once
            g = _Gen(self, n - 1, token, _tail(chat, 8, n))
            self.gen = g
            self.up.add(g)
        else:
            tr.write(_response(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}'))


async def serve(host: str, port: int, rate: float, ready: asyncio.Future[int] | None = None,
                reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    up = Upstream(rate)
    up.start(loop)
    server = await loop.create_server(lambda: _Conn(up), host, port, backlog=4096, reuse_address=True,
                                      reuse_port=reuse_port or None)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    shared = " (port shared)" if reuse_port else ""
    print(f"fast upstream on http://{host}:{bound} ({rate:g} tok/s per stream){shared}", flush=True)
    async with server:
        await asyncio.Future()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fast_upstream", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream")
    p.add_argument("--reuse-port", action="store_true",
                   help="bind with SO_REUSEPORT, so several processes serve one port")
    a = p.parse_args(argv)
    if not math.isfinite(a.rate) or a.rate <= 0:
        p.error("--rate must be > 0")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        asyncio.run(serve(a.host, a.port, a.rate, reuse_port=a.reuse_port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
