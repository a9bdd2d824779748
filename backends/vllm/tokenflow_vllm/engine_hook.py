"""General plugin (entry point ``vllm.general_plugins: tokenflow_engine``).

vLLM runs general plugins in every process it starts. Here that (1) refuses unsupported vLLM versions
before anything else happens and (2) adds ``EngineCore.tokenflow_call``, which the API server reaches
with ``engine_core.call_utility_async("tokenflow_call", payload)``: EngineCore dispatches utility calls
by name, between engine steps, on the thread that owns the scheduler.
"""
from __future__ import annotations

import json

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


def register() -> None:
    check_vllm_version()
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, UTILITY, None) is not tokenflow_call:
        setattr(EngineCore, UTILITY, tokenflow_call)
