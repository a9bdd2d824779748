"""The pacing clock: one timer per process for every paced stream.

Streams due at nearly the same time are released in the same wake-up (``slack_s``), so thousands of
paced streams cost one timer callback per tick rather than a timer each. With the default 5 ms slack the
clock wakes at most 200 times a second however many streams it paces, and a token leaves at most 5 ms
before its due time (never after it, but for event-loop lag: ``tokenflow_pacing_lateness_seconds``).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .stream import Stream

# Upper bounds (seconds) of the pacing-lateness histogram: fine below 20 ms, where the target lies.
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Lateness:
    """How late paced releases leave against their due time: plain counters, no lock, no per-sample object.

    One sample per stream released in a wake-up (the clock's lateness for that stream's earliest due token).
    """

    __slots__ = ("counts", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENESS_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, late: float) -> None:
        if late < 0.0:
            late = 0.0  # released within the slack, ahead of time
        self.counts[bisect.bisect_left(LATENESS_BUCKETS, late)] += 1
        self.total += late
        self.n += 1


class LatenessCollector(Collector):
    """Exports a :class:`Lateness` as ``tokenflow_pacing_lateness_seconds``."""

    def __init__(self, lateness: Lateness) -> None:
        self.lateness = lateness

    def collect(self) -> Iterator[HistogramMetricFamily]:
        lat = self.lateness
        cum, buckets = 0, []
        for le, c in zip((*map(str, LATENESS_BUCKETS), "+Inf"), lat.counts):
            cum += c
            buckets.append((le, cum))
        yield HistogramMetricFamily(
            "tokenflow_pacing_lateness_seconds", "How late paced tokens are released against their due time",
            buckets=buckets, sum_value=lat.total,
        )


class PacingClock:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, slack_s: float = 0.005) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._heap: list[tuple[float, int, Stream]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.slack_s = slack_s
        self.wakeups = 0
        self.lateness = Lateness()

    def now(self) -> float:
        return self._loop.time()

    def schedule(self, stream: Stream, due: float) -> None:
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
        release_at = max(now, horizon)
        heap = self._heap
        pop, push, seqs = heapq.heappop, heapq.heappush, self._seq
        # Lateness counted inline (this loop runs once per released stream): Lateness.observe, unrolled.
        lat = self.lateness
        counts, late_sum, late_n = lat.counts, 0.0, 0
        while heap and heap[0][0] <= horizon:
            due, seq, stream = pop(heap)
            if seq != stream._clock_seq:
                continue  # superseded by a reschedule (rate change)
            late = now - due
            if late > 0.0:
                counts[bisect.bisect_left(LATENESS_BUCKETS, late)] += 1
                late_sum += late
            else:
                counts[0] += 1  # released within the slack, ahead of time
            late_n += 1
            nxt = stream.release_due(release_at)
            if nxt < math.inf:
                seq = stream._clock_seq = next(seqs)
                push(heap, (nxt, seq, stream))
        lat.total += late_sum
        lat.n += late_n
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)
