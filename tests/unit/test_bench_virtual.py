"""The virtual-clock bench end to end on the small profile (seconds, not minutes)."""

from __future__ import annotations

from backends.sim.profile import load_profile
from bench.cli import main
from bench.metrics import summarize
from bench.virtual import run_virtual
from bench.workload import WorkloadConfig, generate
from gateway.policy.knobs import TokenFlowKnobs


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


def test_a_simulated_run_keeps_the_policys_account_of_its_stressed_ticks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A burst larger than the engine holds: tokenflow keeps new requests out at first, and says so per tick, as the
    # gateway logs it on a real engine; the file beside the report holds the same records. fcfs reports nothing.
    import gzip
    import json

    prof = load_profile("sim-small")
    specs = generate(WorkloadConfig(kind="burst", n=80, input_mean=256, output_mean=300, seed=3))
    r = run_virtual(prof, specs, "tokenflow", tick_s=0.25)
    first = r.tick_reports[0]
    assert first["t"] == 0.0 and first["held_new"] + first["deferred_new"] > 0
    assert all(x["admit_limit"] in ("", "capacity", "working_set", "kv") for x in r.tick_reports)
    # a fresh engine has computed no prompt yet: the first tick prices prefill at the knob's default, later ones
    # at the engine's measure
    assert first["prefill_tps"] == TokenFlowKnobs().default_prefill_tokens_per_s
    assert any(x["prefill_tps"] not in (-1.0, first["prefill_tps"]) for x in r.tick_reports)
    assert [x["t"] for x in r.tick_reports] == sorted(x["t"] for x in r.tick_reports)
    assert run_virtual(prof, specs, "fcfs", tick_s=0.25).tick_reports == []
    rc = main(["virtual", "--profile", "sim-small", "--n", "80", "--input-mean", "256", "--output-mean", "300",
               "--seed", "3", "--tick", "0.25", "--policies", "fcfs,tokenflow", "--out", str(tmp_path),
               "--no-progress", "--no-plots"])
    assert rc == 0
    saved = json.loads(gzip.decompress((tmp_path / "policy-ticks-tokenflow.json.gz").read_bytes()))
    assert saved == r.tick_reports and not (tmp_path / "policy-ticks-fcfs.json.gz").exists()


def test_a_warm_up_leaves_the_engines_measures_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # As on a real engine after the GPU bench's warm-up: the first tick prices prefill at what the engine measured,
    # not the knob's default; the run's clock starts after the warm-up, and only the workload's tokens count.
    import json

    prof = load_profile("sim-small")
    specs = generate(WorkloadConfig(kind="burst", n=80, input_mean=256, output_mean=300, seed=3))
    cold = run_virtual(prof, specs, "tokenflow", tick_s=0.25)
    warm = run_virtual(prof, specs, "tokenflow", tick_s=0.25, warmup=16)
    default = TokenFlowKnobs().default_prefill_tokens_per_s
    assert cold.tick_reports[0]["prefill_tps"] == default
    assert warm.tick_reports[0]["t"] == 0.0 and warm.tick_reports[0]["prefill_tps"] not in (-1.0, default)
    assert [r.arrival for r in warm.records] == [s.arrival_s for s in specs]
    assert all(r.token_times and r.token_times[0] > r.arrival for r in warm.records)
    assert sum(len(r.token_times) for r in warm.records) == sum(s.output_tokens for s in specs)
    assert 0 < warm.end < cold.end + 60.0
    rc = main(["virtual", "--profile", "sim-small", "--n", "80", "--input-mean", "256", "--output-mean", "300",
               "--seed", "3", "--tick", "0.25", "--policies", "fcfs", "--warmup", "16", "--out", str(tmp_path),
               "--no-progress", "--no-plots"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0 and report["policies"]["fcfs"]["completed"] == 80


def test_the_report_counts_the_engines_preemptions_and_the_policys_apart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Long answers fill the small engine's KV: under fcfs the engine preempts on its own and the policy never does;
    # every preemption tokenflow orders is one the engine counts.
    import json

    rc = main(["virtual", "--profile", "sim-small", "--n", "48", "--input-mean", "512", "--output-mean", "1000",
               "--seed", "3", "--tick", "0.25", "--policies", "fcfs,tokenflow", "--out", str(tmp_path),
               "--no-progress", "--no-plots"])
    assert rc == 0
    pols = json.loads((tmp_path / "report.json").read_text())["policies"]
    assert pols["fcfs"]["policy_preempts"] == 0 and pols["fcfs"]["preemptions"] > 0
    tf = pols["tokenflow"]
    assert tf["policy_preempts"] > 0 and tf["preemptions"] >= tf["policy_preempts"]
    assert tf["preemptions"] == tf["engine_counters"]["preemptions"]
