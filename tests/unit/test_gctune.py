"""The serving process's GC policy: startup objects frozen, survivors frozen each period, a full pass when due."""

from __future__ import annotations

import asyncio
import gc

from gateway.gctune import GcTuner


async def test_freezes_survivors_and_collects_everything_when_due() -> None:
    loop = asyncio.get_running_loop()
    tuner = GcTuner(loop, freeze_every_s=0.01, full_every_s=0.05)
    try:
        tuner.start()
        assert gc.get_freeze_count() > 0  # what startup made is out of the collector's sight
        a: list[object] = []
        a.append(a)  # a cycle, frozen by the next period, freed only by the full pass
        del a
        deadline = loop.time() + 5
        while tuner.full_collections == 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert tuner.full_collections >= 1
    finally:
        tuner.close()
    assert gc.get_freeze_count() == 0  # closed: everything back under the collector
