"""Prometheus metrics (``tokenflow_`` prefix, base units, ``_total`` counters).

Each gateway app owns its registry, so several apps can live in one process (tests, workers).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tallies
from collections.abc import Iterator, Mapping, Sequence
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
_BUFFER_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_TTE_BUCKETS = (0, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)
_RATE_BUCKETS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100, 200, 1000)
_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2, 5)
_TICK_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# Engine counters (docs/engine-control-api.md, state.engine.counters) exposed as tokenflow_engine_<name>_total.
ENGINE_COUNTERS = {
    "preemptions": "Requests preempted on the engine (gateway commands and the engine's own)",
    "resumes": "Held requests resumed on the engine",
    "prefetches": "Held requests whose KV was prefetched to the device",
    "aborts": "Requests aborted on the engine",
    "host_restored_tokens": "Tokens whose KV was restored from host memory",
    "recomputed_tokens": "Tokens recomputed because their KV was gone",
}


class EngineCounters(Collector):
    """Mirrors each engine's monotonic counters, as last read by its control loop, as Prometheus counters.

    The engine owns the counts; the gateway only reports the latest values (an engine restart resets them,
    which Prometheus' rate() treats as a counter reset).
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, float]] = {}

    def update(self, engine: str, counters: Mapping[str, object]) -> None:
        self._values[engine] = {k: float(v) for k, v in counters.items() if k in ENGINE_COUNTERS and isinstance(v, (int, float))}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc in ENGINE_COUNTERS.items():
            fam = CounterMetricFamily(f"tokenflow_engine_{name}", doc, labels=["engine"])
            for engine, values in sorted(self._values.items()):
                if name in values:
                    fam.add_metric([engine], values[name])
            yield fam


class Tally:
    """One labelled count of a :class:`TallyCounter`: a plain attribute, incremented without a lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class TallyCounter(Collector):
    """A counter for the per-token path, exported as ``<name>_total`` with one label.

    prometheus_client's Counter takes a lock on every ``inc``; this one is a plain integer per label value,
    which is safe because only the process's event loop thread updates it.
    """

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name, self.doc, self.label = name, doc, label
        self._tallies: dict[str, Tally] = {}

    def labels(self, value: str) -> Tally:
        t = self._tallies.get(value)
        if t is None:
            t = self._tallies[value] = Tally()
        return t

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, t in sorted(self._tallies.items()):
            fam.add_metric([value], t.value)
        yield fam


class Samples:
    """One labelled series of a :class:`SampleHistogram`: bucket counts (bucket i: values <= bounds[i], the last
    bound +inf) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe_many(self, values: Sequence[float]) -> None:
        # Buckets by binary search and counting in C: prometheus_client's observe walks the bounds in Python
        # under a lock (about 1 us a value at best), which made sampling 1,000 streams cost 1.7 ms a tick (0.3 here).
        counts = self.counts
        for i, n in Tallies(map(partial(bisect_left, self.bounds), values)).items():
            counts[i] += n
        self.sum += sum(values)


class SampleHistogram(Collector):
    """A histogram for values sampled in bulk (every stream, every control tick), with one label; exported like
    prometheus_client's Histogram (``_bucket``, ``_count``, ``_sum``). Only the event loop thread updates it."""

    def __init__(self, name: str, doc: str, label: str, buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        self._series: dict[str, Samples] = {}

    def labels(self, value: str) -> Samples:
        s = self._series.get(value)
        if s is None:
            s = self._series[value] = Samples(self.bounds)
        return s

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, s in sorted(self._series.items()):
            cumulative, total = [], 0
            for bound, n in zip(self.bounds, s.counts):
                total += n
                cumulative.append((floatToGoString(bound), total))  # the le label as Histogram writes it
            fam.add_metric([value], cumulative, s.sum)
        yield fam


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.streams_active = Gauge("tokenflow_streams_active", "Streams being served", ["engine"], registry=r)
        self.requests = Counter("tokenflow_requests_total", "Client requests by outcome", ["kind", "outcome"], registry=r)
        self.tokens_in = TallyCounter("tokenflow_tokens_in", "Tokens received from engines", "engine")
        r.register(self.tokens_in)
        self.tokens_out = Counter("tokenflow_tokens_out_total", "Tokens delivered to clients", ["engine"], registry=r)
        self.ttft = Histogram("tokenflow_ttft_seconds", "Time to first token sent", ["engine"], buckets=_TTFT_BUCKETS, registry=r)
        self.buffer = SampleHistogram("tokenflow_buffer_tokens", "Client buffer occupancy, sampled each tick", "engine", _BUFFER_BUCKETS)
        r.register(self.buffer)
        self.time_to_empty = SampleHistogram(
            "tokenflow_buffer_time_to_empty_seconds", "Client buffer time-to-empty, sampled each tick", "engine", _TTE_BUCKETS
        )
        r.register(self.time_to_empty)
        self.stall_seconds = Counter("tokenflow_stall_seconds_total", "Time clients spent with an empty buffer", ["engine"], registry=r)
        self.decisions = Counter("tokenflow_decisions_total", "Policy decisions sent to engines", ["engine", "op"], registry=r)
        self.decision_failures = Counter(
            "tokenflow_decision_failures_total", "Decisions the engine refused", ["engine", "op", "code"], registry=r
        )
        self.tick_seconds = Histogram("tokenflow_policy_tick_seconds", "Policy decide() duration", ["engine"], buckets=_TICK_BUCKETS, registry=r)
        # The policy's own account of its last tick (policies that report one: tokenflow), docs/deploy.md "Metrics".
        self.policy_working_set = Gauge("tokenflow_policy_working_set", "Requests the policy may admit (running plus paused)", ["engine"], registry=r)
        self.policy_admitted = Gauge("tokenflow_policy_admitted_requests", "Requests the policy has admitted", ["engine"], registry=r)
        self.policy_held_new = Gauge("tokenflow_policy_held_new_requests", "New requests the policy keeps out of the engine (no first token yet), "
                                     "by why: admission (not admitted) or device (admitted, no room this tick)", ["engine", "why"], registry=r)
        self.policy_capacity = Gauge("tokenflow_policy_capacity_tokens_per_second", "Decode tokens/s the policy estimates the engine sustains (-1: unknown)", ["engine"], registry=r)
        self.policy_demand = Gauge("tokenflow_policy_demand_tokens_per_second", "Tokens/s the admitted readers want", ["engine"], registry=r)
        self.failovers = Counter("tokenflow_failovers_total", "Requests moved off a failed engine mid-answer, by the "
                                 "engine that failed and outcome (continued elsewhere, or ended in error)",
                                 ["engine", "outcome"], registry=r)
        self.errors = Counter("tokenflow_errors_total", "Errors by type", ["type"], registry=r)
        self.engine_up = Gauge("tokenflow_engine_up", "1 if the engine's control API answered the last tick", ["engine"], registry=r)
        self.engine_kv_device = Gauge("tokenflow_engine_kv_device_used_ratio", "Engine device KV in use", ["engine"], registry=r)
        self.engine_kv_host = Gauge("tokenflow_engine_kv_host_used_ratio", "Engine host KV in use", ["engine"], registry=r)
        self.engine_counters = EngineCounters()
        r.register(self.engine_counters)
        self.key_streams_active = Gauge("tokenflow_key_streams_active", "Streams held per API key (by key name)", ["key"], registry=r)
        # Set by the Redis-backed stream registry when one is configured: 1 if the last Redis call succeeded.
        self.redis_up = Gauge("tokenflow_redis_up", "1 if the gateway's last Redis operation succeeded (0 also when no Redis is configured)", registry=r)

        # Measured drain (docs/drain-rate.md): each streamed client's declared vs measured rate, at its end.
        self.client_rate = Histogram(
            "tokenflow_client_rate_tokens_per_second", "Client consumption rate per stream at its end, by kind (declared, measured, effective)",
            ["engine", "kind"], buckets=_RATE_BUCKETS, registry=r,
        )
        self.client_rate_ratio = Histogram(
            "tokenflow_client_rate_measured_ratio", "Measured over declared rate per stream at its end", ["engine"], buckets=_RATIO_BUCKETS, registry=r
        )
        self.clients_stalled = Gauge("tokenflow_clients_stalled", "Clients whose connection stopped draining", ["engine"], registry=r)
        self.client_stalls = Counter("tokenflow_client_stalls_total", "Times a client connection stopped draining", ["engine"], registry=r)
        self.progress_reports = Counter("tokenflow_progress_reports_total", "Client progress reports by outcome", ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
