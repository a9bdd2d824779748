"""A benchmark's runs: ``--policies`` entries with knob overrides of their own, run beside each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.runs import parse_run, parse_runs, run_label

VARIANT = "tokenflow:first_token_grace_s=0;stall_budget_s=0"


def test_a_run_is_a_policy_with_optional_knob_overrides() -> None:
    assert parse_run("andes").policy == "andes" and dict(parse_run("andes").knobs) == {}
    run = parse_run(VARIANT, {"tokenflow": {"stall_budget_s": 5.0, "switch_budget": 0.2}})
    # its own knobs override --knob's, which it keeps otherwise
    assert (run.policy, dict(run.knobs)) == ("tokenflow", {"first_token_grace_s": 0.0, "stall_budget_s": 0.0,
                                                             "switch_budget": 0.2})
    assert parse_run("tokenflow@measured").drain == "measured" and parse_run("tokenflow").drain == "declared"
    # its label names its result files (and salts its prompts): distinct per variant, safe in a path
    assert parse_run("tokenflow:first_token_grace_s=2").label == "tokenflow-first_token_grace_s2"
    assert parse_run("tokenflow:first_token_grace_s=2").label != parse_run("tokenflow").label
    assert run_label(VARIANT) == parse_run(VARIANT).label  # what tools that find a run's files by its name use
    # the same entry again on one engine: the same policy and knobs under a name (and prompts) of its own
    again = parse_run("tokenflow#2:stall_budget_s=8")
    assert (again.policy, dict(again.knobs), again.label) == ("tokenflow", {"stall_budget_s": 8.0},
                                                              "tokenflow-2-stall_budget_s8")
    assert [r.label for r in parse_runs("fcfs,fcfs#2")] == ["fcfs", "fcfs-2"]


@pytest.mark.parametrize(("spec", "says"), [
    (":first_token_grace_s=2", "POLICY"),
    ("tokenflow:first_token_grace_s", "POLICY"),
    ("tokenflow:", "POLICY"),
    ("tokenflow@sometimes", "POLICY"),
    ("fcfs#", "POLICY"),
    ("fcfs#1", "N >= 2"),
    ("fcfs#second", "POLICY"),
    ("tokenflow:first_token_grace=1", "unknown TokenFlowKnobs knob"),
    ("tokenflow:first_token_grace_s=soon", "'soon' is not a number"),
    ("fcfs:stall_budget_s=1", "fcfs has no knobs"),
    ("lifo", "unknown policy 'lifo'"),
    ("andes,tokenflow,andes", "runs named twice: andes"),
    (",", "at least one"),
])
def test_a_bad_entry_is_named_with_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_runs(spec)


def _virtual(out: Path, policies: str, *extra: str) -> dict[str, dict]:  # type: ignore[type-arg]
    rc = main(["virtual", "--profile", "sim-small", "--n", "80", "--input-mean", "256", "--output-mean", "300",
               "--seed", "3", "--tick", "0.25", "--policies", policies, "--out", str(out), "--no-progress",
               "--no-plots", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())["policies"]  # type: ignore[no-any-return]


def test_variants_of_one_policy_run_beside_each_other_with_their_own_knobs(tmp_path: Path) -> None:
    both = _virtual(tmp_path / "both", f"tokenflow,{VARIANT}")
    assert list(both) == ["tokenflow", VARIANT]
    assert both[VARIANT]["run"] == {"policy": "tokenflow", "drain": "declared",
                                    "knobs": {"first_token_grace_s": 0.0, "stall_budget_s": 0.0}}
    # the variant is the policy run alone with those knobs set by --knob, and not the defaults' run
    alone = _virtual(tmp_path / "alone", "tokenflow", "--knob", "tokenflow.first_token_grace_s=0",
                     "--knob", "tokenflow.stall_budget_s=0")["tokenflow"]
    keys = ("ttft_p99_s", "ttft_mean_s", "rebuffer_mean_s", "policy_preempts", "decisions")
    assert {k: both[VARIANT][k] for k in keys} == {k: alone[k] for k in keys}
    assert {k: both["tokenflow"][k] for k in keys} != {k: alone[k] for k in keys}
    # each run's side files carry its label
    assert (tmp_path / "both" / "policy-ticks-tokenflow-first_token_grace_s0-stall_budget_s0.json.gz").exists()
    assert (tmp_path / "both" / "policy-ticks-tokenflow.json.gz").exists()


def test_a_bad_entry_stops_the_benchmark_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown TokenFlowKnobs knob"):
        main(["virtual", "--profile", "sim-small", "--n", "8", "--policies", "tokenflow,tokenflow:grace=1",
              "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert not (tmp_path / "policy-ticks-tokenflow.json.gz").exists()  # the first entry did not run either
    with pytest.raises(SystemExit, match="@measured is for virtual runs"):
        main(["http", "--profile", "sim-small", "--n", "8", "--policies", "tokenflow@measured", "--out", str(tmp_path),
              "--no-progress", "--no-plots"])
    assert not (tmp_path / "report.json").exists()


def test_an_http_run_gives_each_variant_its_own_gateway_with_its_knobs(tmp_path: Path) -> None:
    rc = main(["http", "--profile", "sim-small", "--n", "6", "--input-mean", "64", "--output-mean", "24",
               "--tick", "0.25", "--policies", f"tokenflow,{VARIANT}", "--out", str(tmp_path), "--no-progress",
               "--no-plots", "--gateway-log-level", "info"])
    assert rc == 0
    pols = json.loads((tmp_path / "report.json").read_text())["policies"]
    assert list(pols) == ["tokenflow", VARIANT] and all(m["completed"] == 6 for m in pols.values())

    def started_with(label: str) -> dict:  # type: ignore[type-arg]
        lines = [json.loads(x) for x in (tmp_path / f"gateway-{label}.log").read_text().splitlines()]
        return next(x["policies"] for x in lines if x["msg"] == "gateway ready")  # type: ignore[no-any-return]

    assert started_with("tokenflow") == {"sim": {"policy": "tokenflow", "knobs": {}}}
    assert started_with(parse_run(VARIANT).label) == {
        "sim": {"policy": "tokenflow", "knobs": {"first_token_grace_s": 0.0, "stall_budget_s": 0.0}}}
    assert (tmp_path / f"stream-phases-{parse_run(VARIANT).label}.json.gz").exists()
