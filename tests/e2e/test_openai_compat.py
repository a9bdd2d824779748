"""The official ``openai`` package (async and sync clients) and ``curl -N`` against the gateway, unmodified."""

from __future__ import annotations

import asyncio
import shutil
import time

import openai
import orjson
import pytest

from gateway.app import start_gateway
from gateway.config import load_config


def aclient(gateway, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


MSG = [{"role": "user", "content": "Hello"}]


async def test_chat_non_streaming(gateway, model):
    r = await aclient(gateway).chat.completions.create(model=model, messages=MSG, max_tokens=9)
    assert isinstance(r, openai.types.chat.ChatCompletion)
    assert r.object == "chat.completion" and r.model == model and r.id and r.created > 0
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.finish_reason == "length"
    assert c.message.content.split() == [f"tok{i}" for i in range(9)]  # the simulator's text: tok0 tok1 ...
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (9, r.usage.prompt_tokens + 9)


async def test_chat_streaming_with_usage(gateway, model):
    stream = await aclient(gateway).chat.completions.create(
        model=model, messages=MSG, max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"tokenflow": {"pacing": "none"}},
    )
    chunks = [c async for c in stream]
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content).split() == [f"tok{i}" for i in range(12)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    last = chunks[-1]  # include_usage: a final chunk with no choices and the usage
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_streaming_without_usage_has_no_usage_chunk(gateway, model):
    stream = await aclient(gateway).chat.completions.create(
        model=model, messages=MSG, max_tokens=5, stream=True, extra_body={"tokenflow": {"pacing": "none"}}
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


async def test_completions_streaming_and_not(gateway, model):
    client = aclient(gateway)
    r = await client.completions.create(model=model, prompt="Once", max_tokens=6)
    assert isinstance(r, openai.types.Completion) and r.object == "text_completion"
    assert r.choices[0].text.split() == [f"tok{i}" for i in range(6)] and r.usage.completion_tokens == 6
    stream = await client.completions.create(
        model=model, prompt="Once", max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"tokenflow": {"pacing": "none"}},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices).split() == [f"tok{i}" for i in range(6)]
    assert chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("declared, expected", [(12, 12.0), ("listening", 3.3)])
async def test_extra_body_declares_the_rate(gateway, http, model, declared, expected):
    raw = await aclient(gateway).chat.completions.with_raw_response.create(
        model=model, messages=MSG, max_tokens=40, stream=True, extra_body={"tokenflow": {"rate": declared}}
    )
    sid = raw.headers["X-TokenFlow-Stream-Id"]
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    assert raw.headers["X-Accel-Buffering"] == "no"
    stream = raw.parse()
    first = await stream.__anext__()
    assert first.choices[0].delta.content
    async with http.get(f"{gateway.url}/v1/streams/{sid}") as r:
        info = await r.json()
    assert info["rate"] == expected and info["rate_declared"] is True and info["pacing"] == "smooth"
    await stream.close()


async def test_sync_client_streams(gateway, model):
    def run() -> list[str]:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        out = []
        for chunk in client.chat.completions.create(
            model=model, messages=MSG, max_tokens=8, stream=True, extra_body={"tokenflow": {"rate": 200}}
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                out.append(chunk.choices[0].delta.content)
        models = client.models.list()
        assert model in [m.id for m in models.data]
        return out

    assert "".join(await asyncio.to_thread(run)).split() == [f"tok{i}" for i in range(8)]


async def test_errors_raise_the_right_exception_classes(gateway, model):
    client = aclient(gateway)
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="no-such-model", messages=MSG)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=model, messages=MSG, max_tokens=-1)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=model, prompt="x", extra_body={"tokenflow": {"rate": "warp-speed"}})
    assert "rate" in e.value.message
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=model, messages=MSG, stream=True,
                                             stream_options={"include_usage": "yes"})

    keyed = await start_gateway(load_config(None, **{"server.port": 0, "auth.keys": [
        {"name": "k", "key": "sk-test-key", "max_streams": 1}]}), port=0)
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            await aclient(keyed, "sk-not-the-key").chat.completions.create(model=model, messages=MSG)
        assert e.value.status_code == 401
        ok = aclient(keyed, "sk-test-key")
        held = await ok.chat.completions.create(model=model, messages=MSG, max_tokens=300, stream=True,
                                                extra_body={"tokenflow": {"rate": 2}})
        await held.__anext__()
        with pytest.raises(openai.RateLimitError) as e:
            await ok.chat.completions.create(model=model, messages=MSG, max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers.get("Retry-After")
        await held.close()
    finally:
        await keyed.close()


async def test_curl_sees_the_stream_arrive_incrementally(gateway, model):
    # 20 tokens paced at 10 tokens/s: a client that buffered the response would see everything at the end.
    body = orjson.dumps({"model": model, "messages": MSG, "stream": True, "max_tokens": 20, "tokenflow": {"rate": 10}})
    assert shutil.which("curl"), "needs the curl binary: scripts/install-test-deps.sh installs it"
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--fail-with-body", gateway.url + "/v1/chat/completions",
        "-H", "Content-Type: application/json", "-d", body.decode(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    arrivals: list[float] = []
    payloads: list[bytes] = []
    async for line in proc.stdout:
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic() - t0)
            payloads.append(line[6:].strip())
    assert await proc.wait() == 0, (await proc.stderr.read()).decode() if proc.stderr else ""
    assert payloads[-1] == b"[DONE]"
    tokens = [orjson.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:-1]]
    assert "".join(t for t in tokens if t).split() == [f"tok{i}" for i in range(20)]
    # Paced at 10/s the 20 tokens span ~1.9 s; curl must have printed the first long before the last.
    assert arrivals[-1] - arrivals[0] > 1.2
    assert arrivals[0] < arrivals[-1] / 2
