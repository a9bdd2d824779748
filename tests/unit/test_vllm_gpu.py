"""The GPU phases' plumbing that runs without a GPU: run specs and stopping a detached engine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bench.vllm_gpu import run_label, run_spec, stop_pid


def test_a_run_is_a_policy_with_optional_knob_overrides() -> None:
    assert run_spec("andes") == ("andes", [])
    assert run_spec("tokenflow:first_token_grace_s=2;stall_budget_s=5") == (
        "tokenflow", ["first_token_grace_s=2", "stall_budget_s=5"])
    # its label names its result files (and salts its prompts): distinct per variant, safe in a path
    assert run_label("tokenflow:first_token_grace_s=2") == "tokenflow-first_token_grace_s2"
    assert run_label("tokenflow:first_token_grace_s=2") != run_label("tokenflow")
    for bad in (":first_token_grace_s=2", "tokenflow:first_token_grace_s"):
        with pytest.raises(ValueError, match="POLICY"):
            run_spec(bad)


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
