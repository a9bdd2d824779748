"""The demo page's server side: off by default, its files, its burst control's validation, a policy per engine."""

from __future__ import annotations

import pytest

from gateway.app import start_gateway
from gateway.cli import demo_config
from gateway.config import load_config
from gateway.web import DEMO_ENGINES
from tests.conftest import wait_for


async def test_the_demo_is_off_by_default(http):
    gw = await start_gateway(load_config(None, **{"server.port": 0}), port=0)
    try:
        for path in ("/", "/demo/info", "/demo/static/demo.js"):
            async with http.get(gw.url + path) as r:
                assert r.status == 404, path
    finally:
        await gw.close()


@pytest.fixture
def gateway_config():
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05, "demo.enabled": True, "demo.max_users": 8,
            "engines": DEMO_ENGINES}


async def test_each_engine_runs_its_own_policy(gateway, http):
    engines = gateway.gateway.engines
    assert {n: h.control.policy.name for n, h in engines.items()} == {"sim-tokenflow": "tokenflow", "sim-fcfs": "fcfs"}
    async with http.get(gateway.url + "/demo/info") as r:
        info = await r.json()
    assert [(e["policy"], e["model"], e["simulated"]) for e in info["engines"]] == [
        ("tokenflow", "sim-small", True), ("fcfs", "sim-small-fcfs", True)]
    assert info["max_users"] == 8


async def test_the_page_is_served_with_a_strict_content_policy(gateway, http):
    async with http.get(gateway.url + "/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        html = await r.text()
    assert "simulator" in html and "<script" in html and "onclick" not in html
    for name in ("demo.js", "chat.js", "sse.js", "burst.js", "demo.css", "favicon.svg"):
        async with http.get(f"{gateway.url}/demo/static/{name}") as r:
            assert r.status == 200, name


@pytest.mark.parametrize("body, param", [
    ({}, "users"), ({"users": 0}, "users"), ({"users": 9}, "users"), ({"users": True}, "users"),
    ({"users": 2, "output_tokens": 8}, "output_tokens"), ({"users": 2, "colour": "red"}, "colour"),
])
async def test_a_bad_burst_request_is_a_400_naming_the_field(gateway, http, body, param):
    async with http.post(gateway.url + "/demo/burst", json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == param


async def test_a_burst_runs_every_user_on_every_engine_and_one_burst_at_a_time(gateway, http):
    async with http.get(gateway.url + "/demo/burst") as r:
        assert (await r.json())["status"] == "idle"
    async with http.post(gateway.url + "/demo/burst", json={"users": 4, "output_tokens": 20}) as r:
        assert r.status == 202
    async with http.post(gateway.url + "/demo/burst", json={"users": 4}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "burst_running"
    state: dict = {}

    async def done() -> bool:
        nonlocal state
        async with http.get(gateway.url + "/demo/burst") as r:
            state = await r.json()
        return state["status"] != "running"

    await wait_for(done, timeout=30)
    assert state["status"] == "done"
    for lane in state["lanes"]:
        assert lane["started"] == lane["finished"] == 4 and lane["errors"] == 0
        assert [r[2] for r in lane["rows"]] == [r[3] for r in lane["rows"]]  # every token of every answer


def test_demo_flag_brings_two_engines_unless_the_config_names_its_own():
    cfg = demo_config(load_config(None))
    assert cfg.demo.enabled and [e.name for e in cfg.engines] == ["sim-tokenflow", "sim-fcfs"]
    assert [cfg.policy_for(e)[0] for e in cfg.engines] == ["tokenflow", "fcfs"]
    own = demo_config(load_config(None, engines=[{"name": "gpu", "url": "http://gpu:8000"}]))
    assert [e.name for e in own.engines] == ["gpu"] and own.demo.enabled


def test_knobs_apply_to_the_engines_of_the_configured_policy_only():
    cfg = load_config(None, **{"scheduler.knobs": {"conservativeness": 3.0}, "engines": DEMO_ENGINES})
    assert cfg.policy_for(cfg.engines[0]) == ("tokenflow", {"conservativeness": 3.0})
    assert cfg.policy_for(cfg.engines[1]) == ("fcfs", {})
