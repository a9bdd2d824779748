"""Shared fixtures: a gateway with its embedded simulated engine, on free ports, in the test's loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.app import RunningGateway, start_gateway
from gateway.config import load_config


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.005) -> float:
    """Poll ``predicate`` until it is true; return the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@pytest.fixture
def gateway_config() -> dict[str, Any]:
    """Overrides applied to the default config; tests may change them before ``gateway`` is used."""
    return {"server.port": 0, "scheduler.tick_interval_s": 0.05}


@pytest.fixture
async def gateway(gateway_config: dict[str, Any]) -> AsyncIterator[RunningGateway]:
    cfg = load_config(None, **gateway_config)
    gw = await start_gateway(cfg, port=0)
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def model(gateway: RunningGateway) -> str:
    return sorted(gateway.gateway.models)[0]
