"""Keep Python's cyclic garbage collector off the pacing clock's back.

A gateway holding thousands of streams keeps tens of thousands of tracked objects alive (per stream: tasks,
coroutines, transports, buffers). CPython's collector rescans the old ones every few seconds under stream
churn; on a busy core each full pass took 100 ms or more, every paced token due meanwhile left that late,
and collection took about a tenth of the gateway's CPU. Streaming itself makes no cyclic garbage (a stream's
objects are freed by reference counting when it ends), so objects that survived a while are moved out of the
collector's sight (``gc.freeze``) every ``freeze_every_s``: collections then only scan the young. Once every
``full_every_s`` everything is unfrozen and collected in one pass, so a cycle made by a rare path (an error
with its traceback, say) is freed within that time: one pause per interval instead of one every few seconds.
"""

from __future__ import annotations

import asyncio
import gc


class GcTuner:
    def __init__(self, loop: asyncio.AbstractEventLoop, freeze_every_s: float = 1.0, full_every_s: float = 300.0
                 ) -> None:
        self._loop = loop
        self.freeze_every_s = freeze_every_s
        self.full_every_s = full_every_s
        self._timer: asyncio.TimerHandle | None = None
        self._next_full = 0.0
        self.full_collections = 0

    def start(self) -> None:
        """Freeze what startup made (imports, config, the app) and begin the periodic freeze."""
        gc.collect()
        gc.freeze()
        self._next_full = self._loop.time() + self.full_every_s
        self._timer = self._loop.call_later(self.freeze_every_s, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        if now >= self._next_full:
            self._next_full = now + self.full_every_s
            gc.unfreeze()
            gc.collect()
            self.full_collections += 1
        gc.freeze()  # O(1): the generations' lists are spliced onto the permanent one
        self._timer = self._loop.call_later(self.freeze_every_s, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()
