"""The GPU phases' plumbing that runs without a GPU: stopping a detached engine, decode-cost's sums."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.vllm_gpu import (
    Server,
    _json_object,
    _prompt_rate_fit,
    decode_bodies,
    decode_costs,
    itl_totals,
    run_fits,
    serve_args,
    stop_left_engine,
    stop_pid,
)


def test_stopping_an_engine_started_detached_does_not_wait_for_its_zombie() -> None:
    # A detached engine is our child in its own process group; stopped by pid alone (no Popen to wait on), its
    # exit left a zombie that kept the group alive, and stop_pid waited out its 60 s + 30 s on every GPU call.
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    t = threading.Thread(target=stop_pid, args=(p.pid,), daemon=True)
    t.start()
    t.join(timeout=30)  # a hang check: the fix returns at once, the old code after 90 s
    assert not t.is_alive(), "stop_pid kept polling a process group that only held a zombie"
    with pytest.raises(ProcessLookupError):
        os.kill(p.pid, 0)  # stopped and reaped: no zombie left behind either
    p.wait(timeout=5)  # (settles the Popen object: its child was reaped by stop_pid)


def test_a_new_burst_stops_the_engine_an_earlier_call_left_for_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An engine left up for --continue holds the GPU's memory: a burst that starts its own engine stops it first
    # (else the new one fails its start-up, as on the H200) and forgets it.
    import bench.vllm_gpu as vg

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    state = tmp_path / "burst-state.json"
    state.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": p.pid, "done": ["andes"]}))
    monkeypatch.setattr(vg, "BURST_STATE", state)
    stop_left_engine()
    assert p.wait(timeout=5) is not None and not state.exists()
    stop_left_engine()  # nothing left: nothing to do


def test_continue_after_the_engine_died_runs_what_is_left_on_a_new_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the H200 an engine died between calls: --continue then failed, the next call began the list again and spent
    # the engine on a run already done. Now the runs done stand and only the rest run, on a new engine.
    import io
    import urllib.request

    import bench.vllm_gpu as vg

    state = tmp_path / "burst-state.json"
    state.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": 2**22 + 7, "done": ["andes"]}))
    monkeypatch.setattr(vg, "BURST_STATE", state)
    started: list[str] = []
    ran: list[list[str]] = []

    class FakeServer:
        pid, proc = 4242, None

        def __init__(self, *args: object, **kwargs: object) -> None: ...

        def __enter__(self) -> str:
            started.append("engine")
            return "http://127.0.0.1:9"

    class FakeBench:
        returncode, pid = 0, 4243

        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            ran.append(cmd)

        def communicate(self, timeout: float | None = None) -> tuple[str, str]:
            return "", ""

    real_urlopen = urllib.request.urlopen

    def urlopen(url: str, *args: object, **kwargs: object) -> object:
        if url.startswith("http://127.0.0.1:9/"):
            return io.BytesIO(json.dumps({"engine": {}}).encode())
        return real_urlopen(url, *args, **kwargs)  # the dead engine: connection refused

    monkeypatch.setattr(vg, "Server", FakeServer)
    monkeypatch.setattr(vg, "serve_args", lambda *args, **kwargs: ["vllm"])
    monkeypatch.setattr(vg.subprocess, "Popen", FakeBench)
    monkeypatch.setattr(vg.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(vg, "stop_pid", lambda *args: None)
    a = argparse.Namespace(policies="andes,tokenflow", cpu=True, continue_=True, warmup=0, deadline_s=500.0,
                           max_num_seqs=8, host_gib=1, plugin_path=None, burst_config="c.yaml",
                           engine_down_after_s=30.0, n=None, output_mean=None, kv_tokens=1000)
    res = vg.phase_burst(a, tmp_path)
    assert started == ["engine"]
    assert [cmd[cmd.index("--policies") + 1] for cmd in ran] == ["tokenflow"]
    assert res["done"] == ["andes", "tokenflow"] and not state.exists()


def test_a_run_starts_only_if_its_request_timeout_covers_the_slowest_run_so_far() -> None:
    # The twelfth H200 sitting: fcfs took 134 s, 207 s were left, and tokenflow started with a request timeout of
    # 117 s (207 - 90), where its runs take 118-124 s: 6 streams were cut. It now waits for the next call.
    assert not run_fits(207.0, 134.0)
    assert run_fits(90.0 + 1.15 * 134.0, 134.0)  # its timeout covers the slowest run with 15 % to spare
    assert run_fits(100.0, 0.0)  # a call's first run has no measure: it runs with what is left
    assert not run_fits(10.0, 40.0)  # never on the request timeout's 60 s floor alone


# What prometheus_client serves for vLLM's histogram (two engines of a data-parallel server, buckets, _created).
METRICS = """\
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="llama3-8b-shape"} 12.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="llama3-8b-shape"} 40.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="llama3-8b-shape"} 40.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="llama3-8b-shape"} 0.8
vllm:inter_token_latency_seconds_count{engine="1",model_name="llama3-8b-shape"} 10.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="llama3-8b-shape"} 0.2
vllm:inter_token_latency_seconds_created{engine="0",model_name="llama3-8b-shape"} 1.7649e+09
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="llama3-8b-shape"} 99.0
"""


def test_the_engines_inter_token_latency_is_summed_from_vllms_histogram() -> None:
    assert itl_totals(METRICS) == pytest.approx((1.0, 50.0))
    assert itl_totals("# a server without the metric\n") == (0.0, 0.0)


def test_decode_cost_pairs_each_mode_with_plain_in_the_same_repeat() -> None:
    # plain drifts from 10 to 20 ms between repeats; the plugin costs 10 % in each: paired +10 %, medians 15 / 16.5
    runs = {"plain": [10.0, 20.0, 15.0], "plugin": [11.0, 22.0, 16.5]}
    res = {n: [{"batch": 256, "repeat": k, "itl_ms_mean": v, "step_ms_median": None} for k, v in enumerate(vs)]
           for n, vs in runs.items()}
    c = decode_costs(res, [256], ["plain", "plugin"], "itl_ms_mean")[256]["plugin"]
    assert c["added_pct"] == pytest.approx(10.0) and c["added_pct_range"] == [10.0, 10.0]
    assert (c["plain_ms"], c["ms"]) == (15.0, 16.5)
    assert decode_costs(res, [256], ["plain", "plugin"])[256] == {}  # no client-side numbers: nothing to pair


def test_decode_cost_runs_never_share_a_prompt_block() -> None:
    """The plugin's host KV tier is a prefix cache: a run repeating an earlier run's prompts would load their KV on
    the plugin's server and compute it on the plain one (it did, for eight sittings). Every run's prompts are its
    own, down to the first 16-token block; a run is reproducible from its salt."""
    salts = ("plain-0", "plugin-0", "plugin-1", "plain-1")
    runs = {salt: decode_bodies("m", 64, 512, 160, True, salt) for salt in salts}
    first_blocks = [tuple(b["prompt"][:16]) for bodies in runs.values() for b in bodies]
    assert len(set(first_blocks)) == len(first_blocks)
    assert decode_bodies("m", 64, 512, 160, True, "plugin-0") == runs["plugin-0"]
    ids = [b["vllm_xargs"]["tokenflow_id"] for bodies in runs.values() for b in bodies]
    assert len(set(ids)) == len(ids)
    assert all("vllm_xargs" not in b for b in decode_bodies("m", 4, 8, 1, False, "plain-0"))


@pytest.mark.parametrize("cpu", [False, True])
def test_the_plugins_options_reach_the_plugin_servers_kv_transfer_config(cpu: bool) -> None:
    options = _json_object('{"tokenflow_merge_stores": false}')
    a = argparse.Namespace(cpu=cpu, cpu_venv="/venvs/vllm-cpu", kv_extra=options)
    args = serve_args(a, Path("/models/llama"), 8000, plugin=True, prefix=True, host_offload_bytes=1 << 30)
    extra = json.loads(args[args.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert extra["tokenflow_merge_stores"] is False
    assert extra["spec_name"] == "TokenFlowOffloadingSpec" and extra["cpu_bytes_to_use"] == 1 << 30
    if not cpu:  # a plain server has no connector to take them
        assert "--kv-transfer-config" not in serve_args(a, Path("/models/llama"), 8000, plugin=False, prefix=True)
    for bad in ("[1]", "{tokenflow_merge_stores: false}"):
        with pytest.raises(argparse.ArgumentTypeError):
            _json_object(bad)


def test_another_commits_plugin_is_first_on_the_plugin_servers_path_only(tmp_path: Path) -> None:
    # A paired run of two plugin versions on one machine: the server loads the other package, the benchmark (and a
    # plain server, which loads no plugin) stays on this checkout's.
    args = ["vllm", "serve", "/models/llama", "--port", "8000"]
    other = tmp_path / "before"
    srv = Server(args, tmp_path / "vllm.log", plugin=True, cpu=False, plugin_path=other)
    assert srv.env["PYTHONPATH"].split(os.pathsep)[0] == str(other.resolve())
    assert srv.env["PYTHONPATH"].split(os.pathsep)[1:] == [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    plain = Server(args, tmp_path / "plain.log", plugin=False, cpu=False, plugin_path=other)
    assert str(other.resolve()) not in plain.env.get("PYTHONPATH", "")


def test_prefill_rate_fits_the_engines_steps_against_decodes_and_prompt_tokens() -> None:
    # The phase compares the state's prefill rate with this fit of the same server's step trace: a prompt token's
    # cost, with the fixed cost and the decodes beside it accounted apart.
    rows = [{"decode": d, "prefill": p, "dt": 0.0084 + 36e-6 * d + 20e-6 * p}
            for d in (0, 40, 120, 250) for p in (0, 256, 900, 2048)]
    assert _prompt_rate_fit(rows) == pytest.approx(50_000)
    assert _prompt_rate_fit(rows[:3]) is None  # too few steps to fit three terms
