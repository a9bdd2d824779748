"""Workload generators: seeded, reproducible, shaped as configured."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.workload import WorkloadConfig, generate, load_trace, parse_rates


@pytest.mark.parametrize("kind", ["burst", "poisson", "gamma"])
def test_same_seed_same_requests(kind: str) -> None:
    cfg = WorkloadConfig(kind=kind, n=200, rate_rps=4.0, burstiness=3.0, seed=7)
    assert generate(cfg) == generate(cfg)
    assert generate(cfg) != generate(cfg.with_(seed=8))


def test_burst_arrives_at_once_with_normal_lengths() -> None:
    specs = generate(WorkloadConfig(kind="burst", n=2000, input_mean=512, output_mean=2048, seed=1))
    assert len(specs) == 2000 and all(s.arrival_s == 0.0 for s in specs)
    assert statistics.mean(s.prompt_tokens for s in specs) == pytest.approx(512, rel=0.03)
    assert statistics.mean(s.output_tokens for s in specs) == pytest.approx(2048, rel=0.03)
    assert statistics.pstdev(s.output_tokens for s in specs) == pytest.approx(512, rel=0.1)  # 25% default
    assert len({s.id for s in specs}) == 2000


def test_rate_mix_proportions() -> None:
    specs = generate(WorkloadConfig(kind="burst", n=5000, rates=parse_rates("15:0.4,20:0.6"), seed=3))
    share15 = sum(1 for s in specs if s.rate == 15.0) / len(specs)
    assert share15 == pytest.approx(0.4, abs=0.03)
    assert {s.rate for s in specs} == {15.0, 20.0}


def test_named_rate_classes() -> None:
    assert parse_rates("reading:1,listening:3") == ((4.8, 1.0), (3.3, 3.0))
    with pytest.raises(ValueError):
        parse_rates("0:1")


def test_poisson_and_gamma_mean_gap() -> None:
    for kind, b in (("poisson", 1.0), ("gamma", 4.0)):
        specs = generate(WorkloadConfig(kind=kind, n=4000, rate_rps=5.0, burstiness=b, seed=11))
        gaps = [b2.arrival_s - a.arrival_s for a, b2 in zip(specs, specs[1:])]
        assert specs[0].arrival_s == 0.0 and all(g >= 0 for g in gaps)
        assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.08)
        cv2 = statistics.pvariance(gaps) / statistics.mean(gaps) ** 2
        assert cv2 == pytest.approx(b, rel=0.25)


def test_trace_replay(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,input_tokens,output_tokens,rate\n12.5,100,50,20\n10.0,30,40,4.8\n")
    specs = generate(WorkloadConfig(kind="trace", trace=str(p), n=0))
    assert [(s.arrival_s, s.prompt_tokens, s.output_tokens, s.rate) for s in specs] == [
        (0.0, 30, 40, 4.8), (2.5, 100, 50, 20.0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_tokens\n1,2\n")
    with pytest.raises(ValueError):
        load_trace(bad)
