"""The OpenAI side every engine serves next to the control API: what the gateway relies on."""

from __future__ import annotations

import pytest

from .client import EngineAPI, new_id
from .test_control_api import check_error_shape


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_streaming_delivers_exactly_max_tokens_with_usage(api: EngineAPI, chat: bool) -> None:
    rid = new_id()
    st = await api.start(rid, 16, chat=chat)
    await st.finished()
    assert st.saw_done
    assert st.count == 16 and st.finish_reason == "length"
    assert st.usage is not None and st.usage["completion_tokens"] == 16
    assert st.usage["prompt_tokens"] > 0
    assert st.usage["total_tokens"] == st.usage["prompt_tokens"] + 16
    assert len(st.token_ids) == 16


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_non_streaming_request(api: EngineAPI, chat: bool) -> None:
    body = await api.body(new_id(), 8, chat=chat, stream=False)
    status, obj, _ = await api.post_raw("/v1/chat/completions" if chat else "/v1/completions", json=body)
    assert status == 200, obj
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "length"
    assert obj["usage"]["completion_tokens"] == 8
    text = choice["message"]["content"] if chat else choice["text"]
    assert isinstance(text, str) and text


async def test_request_without_an_id_is_served(api: EngineAPI) -> None:
    body = await api.body(None, 4, stream=False)
    status, obj, _ = await api.post_raw("/v1/completions", json=body)
    assert status == 200 and obj["usage"]["completion_tokens"] == 4


async def test_models_and_health(api: EngineAPI) -> None:
    async with api.s.get(api.url + "/v1/models") as r:
        assert r.status == 200
        data = (await r.json())["data"]
    assert data and isinstance(data[0]["id"], str)
    async with api.s.get(api.url + "/health") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "patch",
    [
        {"max_tokens": 0},
        {"max_tokens": "many"},
        {"n": 2},
        {"vllm_xargs": {"tokenflow_id": "has space"}},
        {"vllm_xargs": {"tokenflow_id": "x" * 129}},
        {"prompt": None},
        {"stream": "yes"},
    ],
    ids=["max_tokens0", "max_tokens_str", "n2", "id_space", "id_long", "no_prompt", "stream_str"],
)
async def test_bad_completion_requests_get_400(api: EngineAPI, patch: dict) -> None:
    body = await api.body(new_id(), 4, stream=False)
    body.update(patch)
    if body.get("prompt") is None:
        body.pop("prompt")
    status, obj, _ = await api.post_raw("/v1/completions", json=body)
    assert status == 400, (patch, status, obj)
    check_error_shape(obj)


async def test_invalid_json_gets_400(api: EngineAPI) -> None:
    status, obj, _ = await api.post_raw("/v1/completions", data=b"{oops")
    assert status == 400
    check_error_shape(obj)
