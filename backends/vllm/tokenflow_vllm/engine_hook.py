"""General plugin (entry point ``vllm.general_plugins: tokenflow_engine``).

vLLM runs general plugins in every process it starts. Here that (1) refuses unsupported vLLM versions
before anything else happens, (2) sends the plugin's log lines where vLLM sends its own and (3) adds
``EngineCore.tokenflow_call``, which the API server reaches with
``engine_core.call_utility_async("tokenflow_call", payload)``: EngineCore dispatches utility calls by name,
between engine steps, on the thread that owns the scheduler.
"""
from __future__ import annotations

import json
import logging

from tokenflow_vllm.compat import check_vllm_version

UTILITY = "tokenflow_call"


def tokenflow_call(self, payload: str) -> str:
    fn = getattr(self.scheduler, "tokenflow_call", None)
    if fn is None:
        return json.dumps(
            {
                "error": "the engine does not run the TokenFlow scheduler; start vLLM with "
                "--scheduler-cls tokenflow_vllm.scheduler.TokenFlowScheduler (or TokenFlowAsyncScheduler)"
            }
        )
    return fn(payload)


def log_like_vllm() -> None:
    """The ``tokenflow_vllm`` loggers write through vLLM's handler, at its level and in its format: vLLM configures
    its own logger only, so the plugin's INFO lines (which offload worker runs, a connector left as it was) were
    dropped and its warnings printed bare. Nothing changes when vLLM's logging is off (VLLM_CONFIGURE_LOGGING=0)
    or the plugin's logger was configured already."""
    import vllm.logger  # noqa: F401  (configures vLLM's logger on import)

    ours, vllms = logging.getLogger("tokenflow_vllm"), logging.getLogger("vllm")
    if ours.handlers or not vllms.handlers:
        return
    for handler in vllms.handlers:
        ours.addHandler(handler)
    ours.setLevel(vllms.level)
    ours.propagate = False


def register() -> None:
    check_vllm_version()
    log_like_vllm()
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, UTILITY, None) is not tokenflow_call:
        setattr(EngineCore, UTILITY, tokenflow_call)
