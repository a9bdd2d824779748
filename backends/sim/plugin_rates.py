"""The vLLM plugin's step-rate accounting (``backends/vllm/tokenflow_vllm/rates.py``), loaded by path.

The plugin's package is installed in vLLM's environment, not the gateway's; its rates module is pure Python, so
the simulator (``engine.prefill_rate_measure: fitted``) and ``calibrate prefill-rates`` run the plugin's own code
on their steps instead of a copy of it.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parents[1] / "vllm" / "tokenflow_vllm" / "rates.py"


@functools.cache
def module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tokenflow_vllm_rates", PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
