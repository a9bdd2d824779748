"""``pacing: "phrase"`` over real HTTP with the official client: whole words in every event, phrases at the
listener's rate, progress reports as for any paced stream."""

from __future__ import annotations

import re
import time

import openai
import pytest

from gateway.streams.phrase_stream import MAX_WORDS


def oai(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


async def test_a_phrase_stream_sends_whole_phrases_at_the_listeners_rate(gateway, model):
    rate, n = 10.0, 1 + 3 * MAX_WORDS
    t0 = time.monotonic()
    chunks: list[tuple[float, str]] = []
    stream = await oai(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Read me something"}], stream=True, max_tokens=n,
        extra_body={"tokenflow": {"rate": rate, "pacing": "phrase"}},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append((time.monotonic() - t0, chunk.choices[0].delta.content))
    texts = [c for _, c in chunks]
    assert "".join(texts) == "".join(f" tok{i}" for i in range(n))
    assert all(re.fullmatch(r"( tok\d+)+", t) for t in texts)  # whole words only
    # The first word at once (the listener waits for it), then phrases of MAX_WORDS words.
    assert [len(t.split()) for t in texts] == [1, MAX_WORDS, MAX_WORDS, MAX_WORDS]
    # One phrase ahead of the listener: each phrase leaves when the listener starts the one before it, and
    # token k is heard (k - 1) / rate after the first. The second phrase goes as soon as the engine has made it.
    first = chunks[0][0]
    assert chunks[1][0] - first < 0.5
    for (t, _), k in zip(chunks[2:], (2, 2 + MAX_WORDS)):
        assert t - first == pytest.approx((k - 1) / rate, abs=0.15)


async def test_progress_reports_on_a_phrase_stream(gateway, http, model):
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 40,
            "tokenflow": {"rate": "listening", "pacing": "phrase"}}
    async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        sid = resp.headers["X-TokenFlow-Stream-Id"]
        ids = []
        async for line in resp.content:
            if line.startswith(b"id: "):
                ids.append(int(line.rsplit(b":", 1)[1]))
                if len(ids) == 2:
                    break
        async with http.post(f"{gateway.url}/v1/streams/{sid}/progress", json={"consumed_tokens": ids[-1]}) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{gateway.url}/v1/streams/{sid}/progress", json={"consumed_tokens": ids[-1] + 1}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "progress_beyond_delivered"
        async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
            state = await r.json()
        assert state["pacing"] == "phrase" and state["reported_tokens"] == ids[-1] == 1 + MAX_WORDS
        assert state["written_tokens"] >= ids[-1]
