"""The plugin's log lines reach vLLM's log, in its format: what an operator reads to see that the TokenFlow
scheduler and its offload worker are in place (vLLM configures only its own logger; the plugin's INFO lines used
to be dropped)."""
from __future__ import annotations

import re

import pytest

from tests.vllm.conftest import Server

pytestmark = pytest.mark.vllm


def test_the_plugins_start_up_lines_are_in_vllms_log(vllm_server: Server) -> None:
    if vllm_server.proc is None:
        pytest.skip("TOKENFLOW_VLLM_URL: the server's log is not ours to read")
    lines = vllm_server.log.read_text(errors="replace").splitlines()
    ready = [ln for ln in lines if "TokenFlow scheduler ready" in ln]
    offload = [ln for ln in lines if "TokenFlow offload:" in ln]
    assert ready and offload, vllm_server.log_tail()
    # vLLM's own format (level, date, source file and line), not a bare message: it went through vLLM's handler
    for line in (ready[0], offload[0]):
        assert re.search(r"INFO \d\d-\d\d \d\d:\d\d:\d\d \[\S+\.py:\d+\] TokenFlow", line), line
    assert "TokenFlowScheduler" in ready[0] and "host offload=True" in ready[0]
    assert "PortableOffloadingWorker" in offload[0] and "a step's stores merged" in offload[0]
