"""The benchmark's reader-behaviour option and measured-drain variant."""

from __future__ import annotations

from backends.sim.profile import load_profile
from bench.metrics import summarize
from bench.virtual import run_virtual
from bench.workload import WorkloadConfig, generate


def test_slow_share_marks_readers_without_changing_the_requests():
    base = WorkloadConfig(kind="poisson", n=300, rate_rps=5, seed=3)
    plain = generate(base)
    slow = generate(base.with_(slow_share=1 / 3, slow_factor=0.5))
    assert [(s.id, s.arrival_s, s.prompt_tokens, s.output_tokens, s.rate) for s in slow] == [
        (s.id, s.arrival_s, s.prompt_tokens, s.output_tokens, s.rate) for s in plain
    ]
    marked = [s for s in slow if s.true_rate is not None]
    assert 70 <= len(marked) <= 130
    assert all(s.true_rate == s.rate * 0.5 for s in marked)
    assert all(s.true_rate is None for s in plain)


def _run(specs, drain):
    r = run_virtual(load_profile("sim-small"), specs, "tokenflow", tick_s=0.25, drain=drain)
    return summarize(r.records), r


def test_measured_drain_changes_nothing_for_honest_readers():
    specs = generate(WorkloadConfig(kind="burst", n=40, input_mean=256, output_mean=300, seed=1))
    declared, _ = _run(specs, "declared")
    measured, _ = _run(specs, "measured")
    assert measured == declared


def test_slow_readers_are_scored_at_their_true_rate_and_measured():
    specs = generate(WorkloadConfig(kind="burst", n=40, input_mean=256, output_mean=300, seed=1, slow_share=0.5))
    _, r = _run(specs, "measured")
    true = {s.id: s.true_rate or s.rate for s in specs}
    assert all(rec.rate == true[rec.id] for rec in r.records)
    assert all(rec.finished for rec in r.records)
