"""Session-store metrics, read from the store and the resumption statistics at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .base import SessionStore


@dataclass(slots=True)
class SessionStats:
    """What resumption did on this replica (counted by the relay)."""

    resumes: dict[str, int] = field(default_factory=lambda: {"local": 0, "follow": 0, "resubmit": 0, "replay": 0})
    takeovers: int = 0  # streams taken over after their replica's lease expired


class SessionCollector(Collector):
    def __init__(self, store: SessionStore, stats: SessionStats, engines: Callable[[], Iterable[str]]) -> None:
        self.store = store
        self.stats = stats
        self.engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        store, stats = self.store, self.stats
        yield GaugeMetricFamily("tokenflow_session_store_degraded",
                                "1 while the session store is unreachable and streams are served from memory only",
                                value=1 if store.degraded else 0)
        yield CounterMetricFamily("tokenflow_session_store_roundtrips", "Round trips to the session store (Redis)",
                                  value=getattr(store, "roundtrips", 0))
        yield CounterMetricFamily("tokenflow_session_store_errors", "Session store operations that failed",
                                  value=getattr(store, "errors", 0))
        res = CounterMetricFamily("tokenflow_session_resumes", "Streams resumed by a reconnecting client, by how",
                                  labels=["how"])
        for how, n in sorted(stats.resumes.items()):
            res.add_metric([how], n)
        yield res
        yield CounterMetricFamily("tokenflow_session_takeovers",
                                  "Streams this replica took over after their replica's lease expired",
                                  value=stats.takeovers)
        drv = GaugeMetricFamily("tokenflow_engine_driver", "1 while this replica schedules the engine",
                                labels=["engine"])
        for name in sorted(self.engines()):
            drv.add_metric([name], 1 if store.is_driver(name) else 0)
        yield drv
