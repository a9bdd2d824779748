"""The portable offload worker copies KV blocks to host chunks and back byte-exactly (CPU path here; the
same script checks stream ordering and copy/compute overlap on a CUDA machine)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]


def run_check(venv: Path, script: str, *args: str) -> dict:
    """Run one of backends/vllm's check scripts in the vLLM venv; its last line of output is its JSON result."""
    p = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "backends/vllm" / script), *args],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_round_trip_is_byte_exact(vllm_venv: Path) -> None:
    out = run_check(vllm_venv, "check_offload_worker.py", "--device", "cpu", "--layers", "4", "--blocks", "2048",
                    "--page-bytes", "4096")  # fmt: skip
    assert out["round_trip_exact"] is True


def test_merged_stores_copy_each_block_to_its_own_chunk(vllm_venv: Path) -> None:
    """``MergedStores`` over the worker the plugin runs on this machine, with vLLM's own spec classes: a step's
    one-block stores, merged, land byte-exactly in their own host chunks and load back."""
    out = run_check(vllm_venv, "check_merged_stores.py", "--layers", "4", "--blocks", "512", "--page-bytes", "2048",
                    "--steps", "20")  # fmt: skip
    assert out["round_trip_exact"] is True
    assert out["merge_stats"]["jobs_in"] > out["merge_stats"]["jobs_out"] > 0  # the stores were merged
