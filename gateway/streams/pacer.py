"""The pacing clock: one timer per process for every paced stream.

Streams due at nearly the same time are released in the same wake-up (``slack_s``), so thousands of
paced streams cost one timer callback per tick rather than a timer each.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stream import Stream


class PacingClock:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, slack_s: float = 0.001) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._heap: list[tuple[float, int, "Stream"]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.slack_s = slack_s
        self.wakeups = 0

    def now(self) -> float:
        return self._loop.time()

    def schedule(self, stream: "Stream", due: float) -> None:
        """(Re)schedule ``stream`` at ``due``; an earlier entry for it becomes stale and is skipped."""
        seq = stream._clock_seq = next(self._seq)
        heapq.heappush(self._heap, (due, seq, stream))
        if due < self._timer_at:
            self._arm(due)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.wakeups += 1
        now = self._loop.time()
        horizon = now + self.slack_s
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            _, seq, stream = heapq.heappop(heap)
            if seq != stream._clock_seq:
                continue  # superseded by a reschedule (rate change)
            nxt = stream.release_due(max(now, horizon))
            if nxt < math.inf:
                seq = stream._clock_seq = next(self._seq)
                heapq.heappush(heap, (nxt, seq, stream))
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)
