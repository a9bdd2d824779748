"""Fixtures of the engine-control contract suite.

``engine_url``: the engine under test. By default a simulated engine (profile ``sim-small``) started in the
test's event loop; with ``TOKENFLOW_CONTRACT_URL`` set, that engine instead (it must be idle and used by
nobody else while the suite runs). Another backend can also override ``engine_url`` in its own conftest.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .client import EngineAPI

# Measurements worth reporting (for example the disconnect -> gone time), printed at the end of the run.
MEASUREMENTS: dict[str, str] = {}


@pytest.fixture
async def engine_url() -> AsyncIterator[str]:
    url = os.environ.get("TOKENFLOW_CONTRACT_URL")
    if url:
        yield url
        return
    from backends.sim.server import start_engine

    eng = await start_engine("sim-small", host="127.0.0.1", port=0)
    try:
        yield eng.url
    finally:
        await eng.close()


@pytest.fixture
async def api(engine_url: str) -> AsyncIterator[EngineAPI]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as s:
        a = EngineAPI(engine_url, s)
        try:
            yield a
        finally:
            await a.close_streams()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if MEASUREMENTS:
        terminalreporter.write_sep("-", "engine contract measurements")
        for k, v in MEASUREMENTS.items():
            terminalreporter.write_line(f"{k}: {v}")
