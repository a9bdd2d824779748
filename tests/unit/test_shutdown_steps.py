"""Shutdown steps are bounded: one that never finishes (a peer that never answers a close) is abandoned with an
error naming it, and the steps after it still run."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.app import Gateway
from gateway.config import load_config


async def test_a_hanging_shutdown_step_is_abandoned_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    gw = Gateway(load_config(None, **{"server.shutdown_timeout_s": 0.2}))
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ran: list[str] = []

    async def next_step() -> None:
        ran.append("next")

    async def failing_step() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="tokenflow.gateway"):
        await asyncio.wait_for(gw._bounded("stuck peer", never), 10)  # returns: the step is abandoned
        await gw._bounded("broken peer", failing_step())
        await gw._bounded("next", next_step())
    assert never.cancelled() and ran == ["next"]
    steps = [getattr(r, "step", None) for r in caplog.records]
    assert steps == ["stuck peer", "broken peer"]
