"""Simulator-specific HTTP behaviour (the engine-agnostic promises live in tests/contract)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from backends.sim.server import RunningEngine, start_engine, text_tokens


@pytest.fixture
async def sim() -> AsyncIterator[RunningEngine]:
    eng = await start_engine("sim-small")
    try:
        yield eng
    finally:
        await eng.close()


@pytest.fixture
async def s() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse(resp: aiohttp.ClientResponse) -> list[dict]:
    out = []
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            out.append(orjson.loads(line[5:]))
    return out


async def test_stream_text_is_ordered_words_one_token_per_chunk(sim: RunningEngine, s) -> None:
    body = {"prompt": "abcdefghi", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "vllm_xargs": {"tokenflow_id": "t1"}}
    async with s.post(sim.url + "/v1/completions", json=body) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        chunks = await sse(r)
    tok = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["text"] for c in tok] == [" tok0", " tok1", " tok2", " tok3", " tok4"]
    assert [c["choices"][0]["token_ids"] for c in tok] == [[0], [1], [2], [3], [4]]
    assert [c["choices"][0]["finish_reason"] for c in tok] == [None] * 4 + ["length"]
    assert all(c["id"] == "cmpl-t1" for c in chunks)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_prompt_token_counts(sim: RunningEngine, s) -> None:
    assert text_tokens("") == 1 and text_tokens("abcd") == 1 and text_tokens("abcde") == 2
    cases = [
        ("/v1/completions", {"prompt": [5, 6, 7, 8, 9, 10, 11]}, 7),
        ("/v1/completions", {"prompt": ["x" * 40]}, 10),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x" * 8},
                                               {"role": "user", "content": [{"type": "text", "text": "y" * 9}]}]},
         2 + 3),
    ]
    for path, extra, expected in cases:
        async with s.post(sim.url + path, json={"max_tokens": 1, **extra}) as r:
            obj = await r.json()
            assert r.status == 200, obj
        assert obj["usage"]["prompt_tokens"] == expected, (extra, obj["usage"])


async def test_chat_stream_has_role_on_first_token(sim: RunningEngine, s) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with s.post(sim.url + "/v1/chat/completions", json=body) as r:
        chunks = await sse(r)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": " tok0"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == " tok0 tok1 tok2"


async def test_default_max_tokens_and_context_limit(sim: RunningEngine, s) -> None:
    async with s.post(sim.url + "/v1/completions", json={"prompt": [1] * 10}) as r:
        obj = await r.json()
    assert obj["usage"]["completion_tokens"] == 256
    mml = sim.core.profile.max_model_len
    async with s.post(sim.url + "/v1/completions", json={"prompt": [1] * 10, "max_tokens": mml}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "context_length_exceeded"
    async with s.post(sim.url + "/v1/completions", json={"prompt": [1] * mml}) as r:
        assert r.status == 400


async def test_models_say_simulated(sim: RunningEngine, s) -> None:
    async with s.get(sim.url + "/v1/models") as r:
        m = (await r.json())["data"][0]
    assert m["owned_by"] == "tokenflow-simulator" and m["id"] == "sim-small"
    async with s.get(sim.url + "/metrics") as r:
        text = await r.text()
    assert r.status == 200 and "tokenflow_sim_num_running" in text


async def test_tokens_are_paced_by_the_cost_model(sim: RunningEngine, s) -> None:
    """The wall-clock shell never runs ahead of the cost model (a lower bound, safe on a loaded machine)."""
    p = sim.core.profile
    n = 30
    t0 = time.monotonic()
    async with s.post(sim.url + "/v1/completions", json={"prompt": [1] * 100, "max_tokens": n}) as r:
        assert r.status == 200
        await r.json()
    took = time.monotonic() - t0
    model = p.prefill_time(100) + sum(p.decode_step_time(1, 100 + k) for k in range(1, n))
    assert took >= model * 0.95
    st = sim.core.state(0.0)["engine"]
    assert st["step_time_s"] == pytest.approx(p.decode_step_time(1, 100 + n - 1), rel=0.2)


async def test_commands_wait_for_the_step_boundary(sim: RunningEngine, s) -> None:
    """A command sent mid-step is applied after the step: the step's token is delivered, then none."""
    body = {"prompt": [1] * 10, "max_tokens": 500, "stream": True, "vllm_xargs": {"tokenflow_id": "b1"}}
    r = await s.post(sim.url + "/v1/completions", json=body)
    got = 0
    async for raw in r.content:
        if raw.startswith(b"data:"):
            got += 1
            if got == 3:
                break
    async with s.post(sim.url + "/control/v1/requests/b1/preempt") as rr:
        assert (await rr.json())["status"] == "held"
    held = sim.core.output_tokens("b1")
    await asyncio.sleep(0.2)
    assert sim.core.output_tokens("b1") == held
    r.close()
