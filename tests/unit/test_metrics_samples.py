"""SampleHistogram (bulk-sampled buffers) exports what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import SampleHistogram

BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_same_exposition_as_a_prometheus_histogram() -> None:
    rng = random.Random(1)
    ref_reg, reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("t_buffer_tokens", "doc", ["engine"], buckets=BUCKETS, registry=ref_reg)
    ours = SampleHistogram("t_buffer_tokens", "doc", "engine", BUCKETS)
    reg.register(ours)
    for tick in range(20):
        for engine in ("a", "b"):
            # boundaries (a value equal to a bound falls in that bound's bucket), 0, fractions, past the last, inf
            values = [float(rng.choice((0, 1, 5, 100, 101, math.inf, rng.uniform(0, 200), rng.randint(0, 60))))
                      for _ in range(rng.randint(0, 50))]
            finite = [v for v in values if v != math.inf] if tick % 2 else values
            for v in finite:
                ref.labels(engine).observe(v)
            ours.labels(engine).observe_many(finite)
    want, got = _samples(ref_reg), _samples(reg)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert got[key] == value or math.isclose(got[key], value, rel_tol=1e-12), key
    assert want[("t_buffer_tokens_count", (("engine", "a"),))] > 100
