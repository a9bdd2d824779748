"""The virtual-clock bench end to end on the small profile (seconds, not minutes)."""

from __future__ import annotations

from backends.sim.profile import load_profile
from bench.cli import main
from bench.metrics import summarize
from bench.virtual import run_virtual
from bench.workload import WorkloadConfig, generate


def test_every_policy_completes_every_request_identically_seeded() -> None:
    prof = load_profile("sim-small")
    specs = generate(WorkloadConfig(kind="burst", n=40, input_mean=256, output_mean=200, seed=2))
    out = {}
    for pol in ("fcfs", "tokenflow", "andes"):
        r = run_virtual(prof, specs, pol, tick_s=0.25)
        m = summarize(r.records, preemptions=r.preemptions)
        assert m["completed"] == 40
        assert m["tokens"] == sum(s.output_tokens for s in specs)
        out[pol] = m
    again = run_virtual(prof, specs, "tokenflow", tick_s=0.25)
    assert summarize(again.records)["ttft_p99_s"] == out["tokenflow"]["ttft_p99_s"]  # deterministic


def test_cli_writes_report_and_plots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rc = main(["virtual", "--profile", "sim-small", "--n", "12", "--input-mean", "128", "--output-mean", "64",
               "--policies", "fcfs,tokenflow", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["policies"]) == {"fcfs", "tokenflow"}
    assert report["policies"]["tokenflow"]["completed"] == 12
    for png in ("ttft_cdf.png", "buffers.png", "throughput.png"):
        assert (tmp_path / png).stat().st_size > 1000
