"""Clients that open a streamed chat completion and never read it: the gateway's worst case for memory."""

from __future__ import annotations

import socket

import orjson


def stalled_readers(url: str, n: int) -> list[socket.socket]:
    """``n`` streams whose clients never read: a 4 KB receive buffer, so each stalls within a few seconds."""
    host, port = url.split("//", 1)[1].split(":")
    body = orjson.dumps({"model": "sim-small", "messages": [{"role": "user", "content": "tell me"}], "stream": True,
                         "max_tokens": 2000})  # the default pacing and rate, as a new user's request
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        s.sendall(req)
        out.append(s)
    return out
