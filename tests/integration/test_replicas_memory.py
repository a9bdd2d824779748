"""Resumption on a single gateway (memory store, the default): reconnect with Last-Event-ID or ?after=N."""

from __future__ import annotations

import asyncio
import json
import time

from tests.conftest import wait_for

from .replicas import Client, lost_and_duplicated


def chat(n: int, rate: float = 200.0) -> Client:
    return Client({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                   "max_tokens": n, "tokenflow": {"rate": rate}}, path="/v1/chat/completions")


async def test_a_dropped_client_resumes_where_it_stopped(gateway, http) -> None:
    c = chat(80)
    await c.start(http, gateway.url, stop_after=15)  # reads 15 tokens, then the connection closes
    assert not c.done and len(c.tokens()) == 15
    sid = c.sid

    async def gone() -> bool:  # the engine is freed at once; the stream stays resumable
        return sid not in gateway.gateway.streams

    await wait_for(gone)
    await c.resume(http, gateway.url, "post")
    assert c.done and lost_and_duplicated([c], 80) == (0, 0, 0)
    assert c.last_id == f"{sid}:80"
    # After the end, any point of the stream can be replayed.
    again = chat(80)
    again.sid, again.last_id = sid, f"{sid}:70"
    await again.resume(http, gateway.url, "get")
    assert again.done and again.tokens() == list(range(70, 80))
    async with http.get(f"{gateway.url}/v1/streams/{sid}/events?after=78") as r:
        text = await r.text()
    assert " tok78" in text and " tok77" not in text and text.rstrip().endswith("data: [DONE]")


async def test_resumed_tokens_are_paced_from_where_the_client_was(gateway, http) -> None:
    c = chat(60, rate=20)
    await c.start(http, gateway.url, stop_after=5)
    t0 = time.monotonic()
    await c.resume(http, gateway.url, "get")
    took = time.monotonic() - t0
    assert c.done and lost_and_duplicated([c], 60) == (0, 0, 0)
    assert took >= 0.7 * 55 / 20, f"55 tokens at 20 tok/s came in {took:.2f} s: not paced"


async def test_a_newer_connection_supersedes_the_older(gateway, http) -> None:
    c = chat(80, rate=60)
    resp = await http.post(gateway.url + c.path, json=c.body)
    await c.read(resp, stop_after=5)
    await c.resume(http, gateway.url, "post")  # the first connection is still open
    assert c.done and lost_and_duplicated([c], 80) == (0, 0, 0)
    old = await asyncio.wait_for(resp.content.read(), 10)  # the older writer ended without [DONE]
    assert b"[DONE]" not in old
    resp.close()


async def test_resume_errors(gateway, http) -> None:
    async def status(method: str, path: str, headers: dict | None = None, json: dict | None = None) -> tuple[int, dict]:
        async with http.request(method, gateway.url + path, headers=headers, json=json) as r:
            return r.status, await r.json()

    body = {"model": "sim-small", "prompt": "x", "stream": True}
    code, err = await status("POST", "/v1/completions", {"Last-Event-ID": "garbage"}, body)
    assert code == 400 and err["error"]["param"] == "Last-Event-ID"
    code, err = await status("POST", "/v1/completions", {"Last-Event-ID": "0123456789abcdef01234567:3"}, body)
    assert code == 404 and err["error"]["code"] == "not_found"
    assert (await status("GET", "/v1/streams/nope/events?after=x"))[0] == 400
    assert (await status("GET", "/v1/streams/bad:id/events"))[0] == 404
    code, err = await status("GET", "/v1/streams/abc/events", {"Last-Event-ID": "other:1"})
    assert code == 400


async def test_an_undecodable_last_event_id_gets_a_json_404(gateway) -> None:
    """Header bytes that are not UTF-8 (found by the fuzz suite): the answer quotes them escaped, as JSON in OpenAI's
    error format, instead of failing to encode its own error message (a 500)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model": "sim-small", "prompt": "x", "stream": true}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Last-Event-ID: \xe9:1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), head
    err = json.loads(payload)["error"]
    assert err["code"] == "not_found" and "\\udce9" in err["message"]
