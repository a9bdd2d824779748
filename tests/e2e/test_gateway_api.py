"""The gateway end to end over real HTTP, with the official ``openai`` client where a user would use it."""

from __future__ import annotations

import asyncio
import statistics
import time

import openai
import orjson
import pytest

from tests.conftest import wait_for


def oai(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


async def test_streaming_chat_is_paced_at_the_declared_rate(gateway, model):
    client = oai(gateway)
    t0 = time.monotonic()
    arrivals: list[float] = []
    text = []
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        max_tokens=30,
        extra_body={"tokenflow": {"rate": 20, "pacing": "smooth"}},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
    assert len(arrivals) == 30
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # The engine makes ~100 tok/s; the reader asked for 20: tokens must leave every ~50 ms.
    assert statistics.median(gaps) == pytest.approx(0.05, rel=0.2)
    # And not merely on average: the whole answer takes (n-1)/rate.
    assert arrivals[-1] - arrivals[0] == pytest.approx(29 / 20, rel=0.2)
    assert arrivals[0] - t0 < 2.0  # first token immediately (generous bound for a loaded CI box)


async def test_pacing_none_forwards_as_fast_as_the_engine(gateway, model):
    client = oai(gateway)
    arrivals = []
    stream = await client.completions.create(
        model=model, prompt="Once upon a time", stream=True, max_tokens=60,
        extra_body={"tokenflow": {"rate": 5, "pacing": "none"}},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 60
    # Paced at 5 tok/s this would take 11.8 s; unpaced it is bounded by the engine (~0.6 s).
    assert arrivals[-1] - arrivals[0] < 59 / 5 / 4


async def test_non_streaming_chat_and_completion(gateway, model):
    client = oai(gateway)
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    c = await client.completions.create(model=model, prompt="abc", max_tokens=7)
    assert c.object == "text_completion"
    assert c.usage.completion_tokens == 7 and c.choices[0].text


async def test_stream_usage_and_event_ids(gateway, http, model):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 10,
        "stream_options": {"include_usage": True},
        "tokenflow": {"pacing": "none"},
    }
    async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        sid = resp.headers["X-TokenFlow-Stream-Id"]
        raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    ids = [line.split(": ", 1)[1] for e in events for line in e.splitlines() if line.startswith("id: ")]
    idx = [int(i.split(":")[1]) for i in ids]
    assert all(i.split(":")[0] == sid for i in ids)
    assert idx[:10] == list(range(1, 11))  # one id per token, counting tokens delivered
    usage = orjson.loads(events[-2].split("data: ", 1)[1])["usage"]
    assert usage["completion_tokens"] == 10


async def test_header_rate_is_used(gateway, http, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200}
    async with http.post(gateway.url + "/v1/chat/completions", json=body, headers={"X-TokenFlow-Rate": "4"}) as resp:
        sid = resp.headers["X-TokenFlow-Stream-Id"]
        await resp.content.readline()
        async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
            info = await r.json()
        assert info["rate"] == 4.0 and info["rate_declared"] is True


async def test_gateway_knows_the_buffer_of_a_paced_stream(gateway, http, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 300,
            "tokenflow": {"rate": 5}}
    async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
        sid = resp.headers["X-TokenFlow-Stream-Id"]
        received = 0

        async def buffered() -> bool:
            async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
                info = await r.json()
            return info["buffer_tokens"] >= 20

        await wait_for(buffered, timeout=20)
        async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
            info = await r.json()
        # buffer = produced - consumed, and smooth pacing sends exactly what was consumed
        assert info["buffer_tokens"] == info["generated_tokens"] - info["consumed_tokens"]
        assert info["time_to_empty_s"] == pytest.approx(info["buffer_tokens"] / 5, abs=0.25)
        while received < info["consumed_tokens"]:
            line = await resp.content.readline()
            if line.startswith(b"data: {"):
                received += 1
        assert received == info["consumed_tokens"]


HI = [{"role": "user", "content": "x"}]
MALFORMED = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[]", 400),
    ("/v1/chat/completions", orjson.dumps({"model": "no-such-model", "messages": HI}), 404),
    ("/v1/chat/completions", orjson.dumps({"model": "@", "messages": "hello"}), 400),
    ("/v1/chat/completions", orjson.dumps({"model": "@", "messages": HI, "tokenflow": {"rate": -5}}), 400),
    ("/v1/chat/completions", orjson.dumps({"model": "@", "messages": HI, "tokenflow": {"rate": 1e12}}), 400),
    ("/v1/chat/completions", orjson.dumps({"model": "@", "messages": HI, "max_tokens": 0}), 400),
    ("/v1/chat/completions", orjson.dumps({"model": "@", "messages": HI, "max_tokens": "many"}), 400),
    ("/v1/completions", orjson.dumps({"model": "@", "prompt": 42}), 400),
    ("/v1/completions", orjson.dumps({"model": "@"}), 400),
    ("/v1/completions", orjson.dumps({"model": "@", "prompt": "x", "stream": "true"}), 400),
    ("/v1/nothing-here", b"{}", 404),
]


async def test_malformed_requests_get_openai_errors_and_the_gateway_goes_on(gateway, http, model):
    for path, body, status in MALFORMED:
        body = body.replace(b'"@"', orjson.dumps(model))
        async with http.post(gateway.url + path, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status, (path, body, await r.text())
            err = (await r.json())["error"]
            assert err["message"] and err["type"]
    async with http.get(gateway.url + "/v1/chat/completions") as r:
        assert r.status == 405 and "error" in await r.json()
    r = await oai(gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
    assert r.usage.completion_tokens == 3


async def test_openai_client_raises_the_right_exceptions(gateway, model):
    client = oai(gateway)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert "max_tokens" in str(e.value)


async def test_client_disconnect_frees_the_engine(gateway, http, model):
    engine = gateway.gateway.engines["sim"].client
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2000,
            "tokenflow": {"rate": 10}}
    resp = await http.post(gateway.url + "/v1/chat/completions", json=body)
    sid = resp.headers["X-TokenFlow-Stream-Id"]
    await resp.content.readline()

    async def on_engine() -> bool:
        return sid in (await engine.state()).requests

    await wait_for(on_engine)
    resp.close()  # the client goes away mid-stream

    async def gone() -> bool:
        return not await on_engine()

    took = await wait_for(gone, timeout=5, interval=0.002)
    print(f"engine request gone {took * 1000:.1f} ms after the client closed")

    async def gateway_forgot() -> bool:
        return sid not in gateway.gateway.streams

    await wait_for(gateway_forgot)


async def test_models_health_ready_metrics(gateway, http, model):
    async with http.get(gateway.url + "/v1/models") as r:
        data = await r.json()
        assert model in [m["id"] for m in data["data"]]
    async with http.get(gateway.url + "/healthz") as r:
        assert r.status == 200

    async def ready() -> bool:
        async with http.get(gateway.url + "/readyz") as r:
            return r.status == 200

    await wait_for(ready)
    await oai(gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    async with http.get(gateway.url + "/metrics") as r:
        text = await r.text()
    assert 'tokenflow_tokens_in_total{engine="sim"} 4.0' in text
    assert "tokenflow_ttft_seconds_bucket" in text
    assert "tokenflow_streams_active" in text


async def test_many_concurrent_streams_all_complete_in_order(gateway, http, model):
    async def one(i: int) -> list[str]:
        body = {"model": model, "prompt": f"p{i}", "stream": True, "max_tokens": 25, "tokenflow": {"pacing": "none"}}
        texts = []
        async with http.post(gateway.url + "/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    c = orjson.loads(line[6:])
                    if c["choices"] and c["choices"][0]["text"]:
                        texts.append(c["choices"][0]["text"])
        return texts

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(len(t) == 25 for t in results)
