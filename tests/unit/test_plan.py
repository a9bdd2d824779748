"""``tokenflow plan``: the search over a fake evaluator (answers, N - 1 rows, evaluations), and the real
round-robin evaluation end to end through the command line on a tiny workload (seconds)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from bench.plan import COMPLETED, Metrics, PolicyPlan, make_targets, search
from bench.plan_eval import DEFAULT_PLACEMENT, PlanWorkload, evaluate
from bench.plan_report import policy_table, render
from bench.workload import WorkloadConfig
from gateway.cli import main as cli_main

TTFT = make_targets({"ttft_p99_s": 1.0})


def fake(threshold: int, calls: list[int] | None = None, completed: bool = True):  # type: ignore[no-untyped-def]
    """A monotone evaluator: P99 TTFT 0.5 s from ``threshold`` engines on, 2 s below."""

    def evaluate(n: int) -> Metrics:
        if calls is not None:
            calls.append(n)
        return Metrics(requests=10, completed=10 if completed else 9, ttft_p99_s=0.5 if n >= threshold else 2.0,
                       rebuffer_mean_s=0.0, rebuffer_p99_s=0.0, effective_throughput_tps=100.0 * min(n, threshold),
                       throughput_tps=100.0 * n, n_engines=n)

    return evaluate


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 8, 9, 31, 64])
def test_search_returns_the_smallest_n_and_evaluates_each_n_once(threshold: int) -> None:
    calls: list[int] = []
    plan = search("fcfs", fake(threshold, calls), TTFT, max_n=64)
    assert plan.answer == threshold
    assert len(calls) == len(set(calls))  # no N run twice
    assert len(calls) <= 2 * math.ceil(math.log2(64)) + 1  # doubling then bisection, not a scan
    assert plan.row(threshold) is not None and plan.row(threshold).met  # type: ignore[union-attr]
    assert all(r.met == (r.n_engines >= threshold) for r in plan.rows)


@pytest.mark.parametrize("threshold", [2, 6, 17])
def test_the_row_at_n_minus_1_is_there_marked_and_misses(threshold: int) -> None:
    plan = search("tokenflow", fake(threshold), TTFT, max_n=32)
    below, at = plan.row(threshold - 1), plan.row(threshold)
    assert below is not None and at is not None
    assert not below.met and below.mark == "answer-1"
    assert at.met and at.mark == "answer"
    assert [r.mark for r in plan.rows].count("answer") == 1
    table = policy_table(plan)
    line_below = next(ln for ln in table.splitlines() if ln.startswith(f"| {threshold - 1} "))
    line_at = next(ln for ln in table.splitlines() if ln.startswith(f"| {threshold} "))
    assert "missed" in line_below and "<- answer - 1" in line_below
    assert "MET" in line_at and "<- answer " in line_at
    assert f"tokenflow: {threshold} engines (N-1 = {threshold - 1} misses)" in table


def test_answer_1_has_no_n_minus_1_row() -> None:
    plan = search("fcfs", fake(1), TTFT, max_n=8)
    assert plan.answer == 1 and [r.n_engines for r in plan.rows] == [1]
    assert "N-1 = 0 serves nothing" in policy_table(plan)


def test_a_start_above_the_answer_bisects_below_it() -> None:
    plan = search("fcfs", fake(3), TTFT, max_n=64, start=8)
    assert plan.answer == 3
    assert plan.row(2) is not None and not plan.row(2).met  # type: ignore[union-attr]


def test_never_met_up_to_max_n_has_no_answer() -> None:
    calls: list[int] = []
    plan = search("fcfs", fake(100, calls), TTFT, max_n=12)
    assert plan.answer is None
    assert calls == [1, 2, 4, 8, 12]
    assert "no N up to 12 meets every target" in policy_table(plan)


def test_unfinished_requests_miss_even_when_every_bound_holds() -> None:
    plan = search("fcfs", fake(1, completed=False), TTFT, max_n=4)
    assert plan.answer is None
    assert all(r.checks == {COMPLETED: False, "ttft_p99_s <= 1": True} for r in plan.rows)


def test_throughput_targets_are_floors_and_nan_misses() -> None:
    (floor,) = make_targets({"effective_throughput_tps": 300.0})
    m = fake(2)(4)
    assert floor.describe() == "effective_throughput_tps >= 300"
    assert not floor.met_by(m)  # 200 tok/s
    assert floor.met_by(fake(5)(4))  # 400 tok/s
    (per_engine,) = make_targets({"effective_throughput_per_engine_tps": 60.0})
    assert not per_engine.met_by(m)  # 200 / 4 engines
    (stall,) = make_targets({"rebuffer_mean_s": 1.0})
    nan = Metrics(1, 1, 0.1, math.nan, math.nan, 0.0, 0.0, 1)
    assert not stall.met_by(nan)
    with pytest.raises(ValueError, match="unknown target"):
        make_targets({"ttft_p50_s": 1.0})


def test_evaluate_places_with_the_chosen_placement_on_one_clock() -> None:
    wl = WorkloadConfig(kind="poisson", n=30, rate_rps=10.0, input_mean=100, output_mean=60, seed=3)
    base = PlanWorkload("sim-small", wl)
    assert base.placement == "least-outstanding"
    m = {p: evaluate(replace(base, placement=p), 3, "tokenflow", 1) for p in ("least-outstanding", "round-robin")}
    assert all(x.completed == 30 and x.n_engines == 3 for x in m.values())
    with pytest.raises(ValueError, match="unknown placement"):
        evaluate(replace(base, placement="random"), 2, "tokenflow", 1)


TINY = ["plan", "--profile", "vllm-cpu-tiny", "--workload", "poisson", "--n", "40",
        "--rate-rps", "8", "--input-mean", "128", "--output-mean", "128", "--ttft-p99-s", "1",
        "--rebuffer-mean-s", "0.2", "--max-n", "16"]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_cli_end_to_end_on_a_tiny_workload(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out, err = _run(capsys, [*TINY, "--seed", "1", "--out", str(tmp_path)])
    assert f"placement: {DEFAULT_PLACEMENT}" in out
    # one progress line per run on stderr: policy, N, seconds, verdict
    runs = [ln for ln in err.splitlines() if ln.startswith("plan: ") and " N=" in ln]
    assert runs and all(ln.split()[1] in ("fcfs", "tokenflow") and (" met " in ln or " missed " in ln) for ln in runs)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["placement"] == "least-outstanding" and data["targets"] == ["ttft_p99_s <= 1", "rebuffer_mean_s <= 0.2"]
    assert len(runs) == sum(len(p["rows"]) for p in data["policies"].values())
    for pol in ("fcfs", "tokenflow"):
        p = data["policies"][pol]
        n = p["answer"]
        assert n is not None and n > 1  # one engine of this profile cannot keep P99 TTFT within 1 s here
        rows = {r["n_engines"]: r for r in p["rows"]}
        assert rows[n]["met"] and rows[n]["mark"] == "answer"
        assert rows[n]["metrics"]["completed"] == 40
        assert rows[n]["metrics"]["ttft_p99_s"] <= 1.0
        assert not rows[n - 1]["met"] and rows[n - 1]["mark"] == "answer-1"
        assert f"{pol}: {n} engines (N-1 = {n - 1} misses)" in out
    assert (tmp_path / "plan.txt").read_text() == out
    assert (tmp_path / "plan.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_table(capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = _run(capsys, [*TINY, "--seed", "5", "--policies", "tokenflow"])
    again, _ = _run(capsys, [*TINY, "--seed", "5", "--policies", "tokenflow"])
    other, _ = _run(capsys, [*TINY, "--seed", "6", "--policies", "tokenflow"])
    assert first == again
    table = lambda text: text[text.index("policy tokenflow"):]  # noqa: E731 - the command line differs
    assert table(first) != table(other)


def test_json_output_and_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("profile: vllm-cpu-tiny\npolicies: fcfs\nworkload: poisson\nn: 40\n"
                   "rate_rps: 8\ninput_mean: 128\noutput_mean: 128\nmax_n: 16\ntargets:\n  ttft_p99_s: 1.0\n")
    out, _ = _run(capsys, ["plan", "--config", str(cfg), "--json", "--no-progress", "--rebuffer-mean-s", "0.2"])
    data = json.loads(out)
    assert list(data["policies"]) == ["fcfs"]
    assert data["answers"] == {"fcfs": data["policies"]["fcfs"]["answer"]}
    assert data["targets"] == ["ttft_p99_s <= 1", "rebuffer_mean_s <= 0.2"]  # file and command line together
    assert data["policies"]["fcfs"]["answer"] >= 2


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli_main(["plan", "--n", "10"])  # no target
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  ttft_p99_s: 1\nburst_size: 3\n")
    with pytest.raises(SystemExit):
        cli_main(["plan", "--config", str(bad)])
    for argv in (["--policies", "fcfs,nope"], ["--profile", "nope"], ["--n", "0"], ["--rates", "15:-1"]):
        with pytest.raises(SystemExit):
            cli_main(["plan", "--ttft-p99-s", "1", *argv])


def test_render_names_the_search_assumption() -> None:
    plan: PolicyPlan = search("fcfs", fake(3), TTFT, max_n=8)
    head = {"command": "tokenflow plan", "profile": "p", "placement": DEFAULT_PLACEMENT, "seed": 1, "tick_s": 0.5,
            "workload_text": "w", "targets": ["ttft_p99_s <= 1"]}
    text = render(head, [plan])
    assert "monotone in N" in text and "placement: least-outstanding" in text


def test_text_plot_without_matplotlib_marks_the_bound_and_the_answer() -> None:
    from bench.plan_report import text_plot

    text = text_plot([search("fcfs", fake(3), TTFT, max_n=8)], "ttft_p99_s", 1.0, width=20)
    lines = text.splitlines()[1:]
    assert [ln.split()[1] for ln in lines] == ["N=1", "N=2", "N=3", "N=4"]
    assert all("|" in ln for ln in lines)
    assert [ln.endswith("MET  <- answer") for ln in lines] == [False, False, True, False]


def test_without_matplotlib_the_plot_is_text_beside_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bench.plan_report import write

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if the bench extra were absent
    plans = [search("fcfs", fake(2), TTFT, max_n=4)]
    paths = write(tmp_path, "the table", {"answers": {"fcfs": 2}}, plans, [("ttft_p99_s", "<=", 1.0)])
    assert (tmp_path / "plan.txt").read_text() == "the table\n"
    assert paths[-1] == tmp_path / "plan-plot.txt" and "<- answer" in paths[-1].read_text()
