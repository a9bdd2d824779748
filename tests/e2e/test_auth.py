"""API keys, per-key stream limits, admission 429s and the engine control token, over real HTTP."""

from __future__ import annotations

import hashlib
import logging

import openai
import orjson
import pytest

from backends.sim.server import start_engine
from gateway.app import start_gateway
from gateway.config import load_config
from gateway.logs import JsonFormatter
from tests.conftest import wait_for

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-fedcba9876543210"
CAROL = "sk-carol-from-a-file-42"


@pytest.fixture
def gateway_config(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        f"- name: carol\n  key_sha256: {hashlib.sha256(CAROL.encode()).hexdigest()}\n  rate_class: listening\n"
    )
    return {
        "server.port": 0,
        "scheduler.tick_interval_s": 0.05,
        "auth.keys": [
            {"name": "alice", "key": ALICE, "max_streams": 2},
            {"name": "bob", "key": BOB, "rate_class": "skimming"},
        ],
        "auth.keys_file": str(keys_file),
        "auth.retry_after_s": 3,
    }


def client(gateway, key: str | None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key or "", max_retries=0)


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_requests_without_a_valid_key_get_401_in_openai_format(gateway, http, model):
    wrong = ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer"})
    for headers in wrong:
        async with http.post(gateway.url + "/v1/chat/completions", json=chat(model, max_tokens=3),
                             headers=headers) as r:
            assert r.status == 401, headers
            assert r.headers["WWW-Authenticate"] == "Bearer"
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] in ("missing_api_key", "invalid_api_key") and err["message"]
        async with http.get(gateway.url + "/v1/models", headers=headers) as r:
            assert r.status == 401
    with pytest.raises(openai.AuthenticationError) as e:
        await client(gateway, "sk-wrong").chat.completions.create(**chat(model, max_tokens=3))
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    # Health, readiness and metrics stay open for probes and Prometheus.
    for path in ("/healthz", "/metrics"):
        async with http.get(gateway.url + path) as r:
            assert r.status == 200, path
    # A valid key (inline, or hashed in the keys file) works with the official client.
    for key in (ALICE, BOB, CAROL):
        r = await client(gateway, key).chat.completions.create(**chat(model, max_tokens=3))
        assert r.usage.completion_tokens == 3
    async with http.get(gateway.url + "/metrics") as r:
        text = await r.text()
    assert 'tokenflow_errors_total{type="invalid_api_key"}' in text
    assert 'tokenflow_errors_total{type="missing_api_key"}' in text


async def test_a_key_over_its_stream_limit_gets_429_with_retry_after(gateway, http, model):
    headers = {"Authorization": f"Bearer {ALICE}"}
    body = chat(model, stream=True, max_tokens=400, tokenflow={"rate": 2})
    held = [await http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) for _ in range(2)]
    try:
        for r in held:
            assert r.status == 200
            await r.content.readline()  # the stream is live
        async with http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3"
            err = (await r.json())["error"]
            assert err["code"] == "key_stream_limit" and err["type"] == "rate_limit_error" and "alice" in err["message"]
        with pytest.raises(openai.RateLimitError) as e:
            await client(gateway, ALICE).completions.create(model=model, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "3"
        # Another key is not limited by alice's streams.
        r2 = await client(gateway, BOB).completions.create(model=model, prompt="x", max_tokens=2)
        assert r2.usage.completion_tokens == 2
        async with http.get(gateway.url + "/metrics") as m:
            assert 'tokenflow_key_streams_active{key="alice"} 2.0' in await m.text()
    finally:
        held[0].close()  # the client goes away: its slot comes back
    try:
        async def admitted() -> bool:
            async with http.post(gateway.url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2},
                                 headers=headers) as r:
                return r.status == 200

        await wait_for(admitted, timeout=10, interval=0.05)
    finally:
        held[1].close()


async def test_the_global_stream_limit_answers_429_with_retry_after(http, model):
    cfg = load_config(None, **{"server.port": 0, "server.max_streams": 1, "auth.retry_after_s": 7})
    gw = await start_gateway(cfg, port=0)
    try:
        body = chat(model, stream=True, max_tokens=400, tokenflow={"rate": 2})
        first = await http.post(gw.url + "/v1/chat/completions", json=body)
        try:
            await first.content.readline()
            async with http.post(gw.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "7"
                assert (await r.json())["error"]["code"] == "too_many_streams"
        finally:
            first.close()
    finally:
        await gw.close()


async def test_a_keys_rate_class_is_the_default_rate_of_its_requests(gateway, http, model):
    async def rate_of(key: str, **tf) -> tuple[float, bool]:
        body = chat(model, stream=True, max_tokens=50, **({"tokenflow": tf} if tf else {}))
        async with http.post(gateway.url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
            sid = r.headers["X-TokenFlow-Stream-Id"]
            await r.content.readline()
            async with http.get(f"{gateway.url}/v1/streams/{sid}", headers={"Authorization": f"Bearer {key}"}) as s:
                info = await s.json()
        return info["rate"], info["rate_declared"]

    assert await rate_of(BOB) == (20.0, False)  # bob's class: skimming
    assert await rate_of(CAROL) == (3.3, False)  # carol's (keys file): listening
    assert await rate_of(ALICE) == (8.0, False)  # no class: streams.default_rate
    assert await rate_of(BOB, rate=5) == (5.0, True)  # what the request declares wins


async def test_access_log_names_the_key_and_stream_but_never_the_secret(gateway, http, model, caplog):
    caplog.set_level(logging.INFO, logger="tokenflow")
    r = await client(gateway, BOB).chat.completions.with_raw_response.create(**chat(model, max_tokens=3, stream=True))
    sid = r.headers["X-TokenFlow-Stream-Id"]
    async for _ in r.parse():
        pass
    async with http.get(gateway.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong-secret"}) as resp:
        assert resp.status == 401

    async def logged() -> bool:
        return any(getattr(rec, "stream_id", None) == sid for rec in caplog.records)

    await wait_for(logged)
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    parsed = [orjson.loads(line) for line in lines]  # every line is one JSON object
    access = [p for p in parsed if p["msg"] == "request" and p.get("stream_id") == sid]
    assert len(access) == 1
    a = access[0]
    assert a["key"] == "bob" and a["engine"] == "sim" and a["status"] == 200 and a["level"] == "info"
    assert a["path"] == "/v1/chat/completions" and a["duration_s"] > 0
    assert any(p["msg"] == "request" and p["status"] == 401 and p["key"] is None for p in parsed)
    for line in lines:
        for secret in (ALICE, BOB, CAROL, "sk-wrong-secret"):
            assert secret not in line


async def test_the_engine_control_api_requires_its_token(http):
    engine = await start_engine("sim-small", control_token="ctl-secret")
    try:
        async with http.get(engine.url + "/control/v1/state") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"
        async with http.post(engine.url + "/control/v1/commands", json={"commands": []},
                             headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.get(engine.url + "/control/v1/state", headers={"Authorization": "Bearer ctl-secret"}) as r:
            assert r.status == 200 and r.headers["X-TokenFlow-Control-Version"] == "1"
        async with http.get(engine.url + "/v1/models") as r:  # the OpenAI side is not the control API
            assert r.status == 200

        async def ready(gw) -> bool:
            async with http.get(gw.url + "/readyz") as r:
                return r.status == 200

        # The gateway's auth.control_token is sent to every engine without a token of its own.
        good = load_config(None, **{"server.port": 0, "scheduler.tick_interval_s": 0.05,
                                    "engines": [{"name": "e1", "url": engine.url}], "auth.control_token": "ctl-secret"})
        assert good.engines[0].control_token == "ctl-secret"
        gw = await start_gateway(good, port=0)
        try:
            await wait_for(lambda: ready(gw))
        finally:
            await gw.close()
        # A wrong token: the engine refuses the control loop and the gateway reports it not ready.
        bad = load_config(None, **{"server.port": 0, "scheduler.tick_interval_s": 0.05,
                                   "engines": [{"name": "e1", "url": engine.url, "control_token": "wrong"}]})
        gw = await start_gateway(bad, port=0)
        try:
            control = gw.gateway.engines["e1"].control

            async def ticked_down() -> bool:
                return control.ticks == 0 and not control.healthy and "tokenflow_engine_up{engine=\"e1\"} 0.0" in (
                    gw.gateway.metrics.render().decode())

            await wait_for(ticked_down)
            assert not await ready(gw)
        finally:
            await gw.close()
    finally:
        await engine.close()


def test_bad_auth_config_is_refused():
    with pytest.raises(ValueError, match="exactly one of key or key_sha256"):
        load_config(None, **{"auth.keys": [{"name": "x"}]})
    with pytest.raises(ValueError, match="rate_class 'nope'"):
        load_config(None, **{"auth.keys": [{"name": "x", "key": "k", "rate_class": "nope"}]})
    with pytest.raises(ValueError, match="unique"):
        load_config(None, **{"auth.keys": [{"name": "x", "key": "k"}, {"name": "x", "key": "j"}]})
    with pytest.raises(ValueError, match="keys_file"):
        load_config(None, **{"auth.keys_file": "/nonexistent/keys.yaml"})


async def test_an_engine_at_its_stream_limit_gets_429_and_a_second_engine_takes_the_overflow(http):
    engines = [{"name": "a", "max_streams": 1}, {"name": "b", "max_streams": 1}]  # two embedded sims, same model
    cfg = load_config(None, **{"server.port": 0, "engines": engines, "auth.retry_after_s": 2})
    gw = await start_gateway(cfg, port=0)
    try:
        model = sorted(gw.gateway.models)[0]
        body = chat(model, stream=True, max_tokens=400, tokenflow={"rate": 2})
        held = [await http.post(gw.url + "/v1/chat/completions", json=body) for _ in range(2)]
        try:
            for r in held:
                assert r.status == 200
                await r.content.readline()
            assert sorted(s.engine for s in gw.gateway.streams.values()) == ["a", "b"]  # one on each
            async with http.post(gw.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "2"
                assert (await r.json())["error"]["code"] == "engine_at_capacity"
        finally:
            for r in held:
                r.close()
    finally:
        await gw.close()
