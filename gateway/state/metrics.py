"""Session-store metrics, read from the store and the relay at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..relay import Relay


class SessionCollector(Collector):
    def __init__(self, relay: "Relay") -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        relay, store = self.relay, self.relay.store
        yield GaugeMetricFamily("tokenflow_session_store_degraded",
                                "1 while the session store is unreachable and streams are served from memory only",
                                value=1 if store.degraded else 0)
        yield CounterMetricFamily("tokenflow_session_store_roundtrips", "Round trips to the session store (Redis)",
                                  value=getattr(store, "roundtrips", 0))
        yield CounterMetricFamily("tokenflow_session_store_errors", "Session store operations that failed",
                                  value=getattr(store, "errors", 0))
        res = CounterMetricFamily("tokenflow_session_resumes", "Streams resumed by a reconnecting client, by how",
                                  labels=["how"])
        for how, n in sorted(relay.resumes.items()):
            res.add_metric([how], n)
        yield res
        yield CounterMetricFamily("tokenflow_session_takeovers",
                                  "Streams this replica took over after their replica's lease expired",
                                  value=relay.takeovers)
        drv = GaugeMetricFamily("tokenflow_engine_driver", "1 while this replica schedules the engine", labels=["engine"])
        for name in sorted(relay.gw.engines):
            drv.add_metric([name], 1 if store.is_driver(name) else 0)
        yield drv
