"""Every metric the shipped Grafana dashboard queries is in the gateway's /metrics output, with samples."""

from __future__ import annotations

import json
import re

import openai
import pytest

from gateway.policy.types import Decision
from tests.conftest import wait_for
from tests.deploy.compose import ROOT

DASHBOARD = ROOT / "configs" / "grafana" / "tokenflow.json"
KEY = "sk-dashboard-test"


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\btokenflow_[a-z0-9_]+", e)}


class OneOfEach:
    """A policy that, once per stream, sends a priority change (accepted) and a preempt of an unknown id (refused)."""

    name = "one-of-each"

    def __init__(self) -> None:
        self.done: set[str] = set()

    def decide(self, snapshot, now):
        out = []
        for s in snapshot.streams:
            if s.id not in self.done:
                self.done.add(s.id)
                out += [Decision("priority", s.id, priority=1, reason="test"),
                        Decision("preempt", "no-such-" + s.id, reason="test")]
        return out

    def forget(self, stream_id: str) -> None:
        pass


@pytest.fixture
def gateway_config():
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05, "auth.keys": [{"name": "dash", "key": KEY}]}


async def test_every_dashboard_metric_is_exported(gateway, http, model):
    wanted = dashboard_metrics()
    assert {"tokenflow_ttft_seconds_bucket", "tokenflow_engine_preemptions_total",
            "tokenflow_policy_tick_seconds_bucket", "tokenflow_engine_kv_host_used_ratio",
            "tokenflow_redis_up"} <= wanted
    gateway.gateway.engines["sim"].control.policy = OneOfEach()
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=40, stream=True, extra_body={"tokenflow": {"rate": 40}})
    async for _ in stream:
        pass
    with pytest.raises(openai.AuthenticationError):  # an error sample
        await openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0).models.list()

    def exported(text: str) -> set[str]:
        """Sample names, plus the series every declared family has (labelled families without samples yet
        are declared only by their # TYPE line: event-driven ones, like stalls, that no test run provokes)."""
        names = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ", 3)
                parts = {f"{family}_bucket", f"{family}_sum", f"{family}_count"} if kind == "histogram" else set()
                names |= {family} | parts
            elif line and not line.startswith("#"):
                names.add(line.split("{", 1)[0].split(" ", 1)[0])
        return names

    async def complete() -> bool:
        async with http.get(gateway.url + "/metrics") as r:
            have = exported(await r.text())
        missing = wanted - have
        complete.missing = missing  # type: ignore[attr-defined]
        return not missing

    try:
        await wait_for(complete, timeout=15, interval=0.1)
    except BaseException:  # noqa: BLE001 - pytest.fail's exception included: name what is missing instead
        raise AssertionError(f"dashboard metrics without samples: {sorted(complete.missing)}") from None  # type: ignore[attr-defined]
