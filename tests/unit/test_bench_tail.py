"""bench.tail: where a run's slowest first tokens waited, and the policy's tick lines meanwhile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.tail import phases_before_first_token, report_run, tail_report, tick_lines


def test_the_slowest_requests_phases_add_up_to_their_ttft_and_only_ticks_while_outside_count() -> None:
    slow = {"id": "a", "arrival": 0.0, "first_token": 1.5, "phases": [[0.1, "held", 0], [0.9, "waiting", 0]]}
    fast = {"id": "b", "arrival": 0.0, "first_token": 0.2, "phases": [[0.1, "running", 0]]}
    never = {"id": "c", "arrival": 0.0, "first_token": None, "phases": [[0.1, "held", 0]]}
    assert phases_before_first_token(slow) == [(0.0, 0.1, "accept"), (0.1, 0.9, "held"), (0.9, 1.5, "waiting")]
    ticks = [{"t": 0.05, "admit_limit": "kv"},  # before it was held (accepting): not counted
             {"t": 0.5, "admit_limit": "capacity", "deferred_new": 0},
             {"t": 0.6, "admit_limit": "", "deferred_new": 2},
             {"t": 1.0, "admit_limit": "working_set"}]  # in the engine's queue by then: not counted
    rep = tail_report([slow, fast, never], ticks, share=0.5)
    assert rep.requests == 1 and rep.ttft_s == pytest.approx(1.5)
    assert rep.phase_s == pytest.approx({"accept": 0.1, "held": 0.8, "waiting": 0.6})
    assert rep.ticks_outside == 2 and rep.limits == {"capacity": 1, "": 1} and rep.deferred_ticks == 1
    assert any("capacity 1" in line and "no slot: 1" in line for line in rep.lines())


def test_tick_lines_are_read_from_the_gateway_log_onto_the_run_clock() -> None:
    log = [json.dumps({"ts": 1000.5, "msg": "tick", "admit_limit": "kv"}),
           json.dumps({"ts": 1000.6, "msg": "request", "path": "/v1/completions"}),
           "not json"]
    assert tick_lines(log, t0_epoch=1000.0) == [{"ts": 1000.5, "msg": "tick", "admit_limit": "kv", "t": 0.5}]


def test_a_kept_http_run_says_where_its_slowest_first_tokens_waited(tmp_path: Path) -> None:
    # More readers than the small engine feeds: tokenflow keeps the burst's tail out of the engine for a while, and
    # its tick lines, set on the run's clock, fall in that time (a wrong clock would find none). The run is named as
    # --policies wrote it, a variant here (its files carry its label).
    run = "tokenflow:stall_budget_s=3"
    rc = main(["http", "--profile", "sim-small", "--n", "80", "--input-mean", "256", "--output-mean", "300",
               "--seed", "3", "--tick", "0.25", "--policies", run, "--out", str(tmp_path),
               "--no-progress", "--no-plots", "--gateway-log-level", "info"])
    assert rc == 0
    rep = report_run(tmp_path, run, 0.05)
    assert rep.requests == 4
    assert sum(rep.phase_s.values()) == pytest.approx(rep.ttft_s, abs=1e-6)
    assert rep.phase_s.get("held", 0.0) + rep.phase_s.get("gateway", 0.0) > 0
    assert rep.ticks_outside > 0 and sum(rep.limits.values()) == rep.ticks_outside
