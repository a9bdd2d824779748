"""Command lines for ``vllm serve`` with the TokenFlow plugin (used by the docs, tests and benchmark).

Imports nothing from vLLM, so a test runner outside the vLLM venv can build the command.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PLUGINS = "tokenflow_engine,tokenflow_control"
SCHEDULER_SYNC = "tokenflow_vllm.scheduler.TokenFlowScheduler"
SCHEDULER_ASYNC = "tokenflow_vllm.scheduler.TokenFlowAsyncScheduler"


def kv_transfer_config(host_bytes: int, extra: dict[str, Any] | None = None) -> str:
    """Write-through host offload with the portable worker and held-request pinning; ``extra`` adds keys to
    ``kv_connector_extra_config`` (the plugin's options, e.g. ``{"tokenflow_merge_stores": false}``)."""
    return json.dumps(
        {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "spec_name": "TokenFlowOffloadingSpec",
                "spec_module_path": "tokenflow_vllm.offload.spec",
                "cpu_bytes_to_use": int(host_bytes),
                "offload_prompt_only": False,
                "eviction_policy": "PinnedLRU",
                "cache_policy_module_path": "tokenflow_vllm.offload.policy",
                **(extra or {}),
            },
        }
    )


def checkout_plugin_dir(root: Path, venv: Path) -> Path:
    """Where scripts/install-vllm-cpu.sh puts this checkout's copy of the plugin for a vLLM venv: beside the
    checkout, not in the venv, which several checkouts (and their test runs) share."""
    return Path(root) / ".vllm-plugin" / Path(venv).name


def server_env(cpu: bool = True, plugin_dir: Path | None = None) -> dict[str, str]:
    """Environment of ``vllm serve`` with the plugin; ``plugin_dir``: a folder holding the plugin (see
    :func:`checkout_plugin_dir`), put first on the server's PYTHONPATH."""
    env = {
        "VLLM_PLUGINS": PLUGINS,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    }
    if plugin_dir is not None:
        env["PYTHONPATH"] = str(plugin_dir)
    if cpu:
        # With multiprocessing off the `uni` executor is honoured (no worker process, no OMP binding);
        # EngineCore still runs in its own process, so the control path is the same as on GPU.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # One compute thread unless asked, from the start: without it two engine threads spun (one core and
        # most of the other, measured) even where vLLM reduces torch to one thread for serving. A tiny model
        # gains nothing from more, and an engine spinning on every core of a small machine starves its own
        # API server, whose output backlog then delays streams and control replies by seconds.
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    return env


def cpu_serve_args(
    venv: Path,
    model: Path,
    port: int,
    *,
    served_name: str = "tiny",
    host_offload_bytes: int | None = 64 << 20,
    kv_cache_bytes: int = 256 << 20,
    dtype: str = "float32",
    block_size: int = 32,
    max_model_len: int = 2048,
    max_num_seqs: int = 8,
    extra: list[str] | None = None,
    kv_extra: dict[str, Any] | None = None,
) -> list[str]:
    args = [
        str(Path(venv) / "bin" / "vllm"), "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_name,
        "--dtype", dtype,
        "--enforce-eager",
        "--distributed-executor-backend", "uni",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--block-size", str(block_size),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--scheduling-policy", "priority",
        "--scheduler-cls", SCHEDULER_SYNC,
        "--generation-config", "vllm",
    ]  # fmt: skip
    if host_offload_bytes:
        args += ["--kv-transfer-config", kv_transfer_config(host_offload_bytes, kv_extra)]
    return args + list(extra or [])


def gpu_serve_args(
    vllm: str,
    model: Path,
    port: int,
    *,
    served_name: str,
    plugin: bool = True,
    host_offload_bytes: int | None = 64 << 30,
    kv_cache_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    dtype: str = "bfloat16",
    max_model_len: int = 8192,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = 8192,
    prefix_caching: bool = True,
    extra: list[str] | None = None,
    kv_extra: dict[str, Any] | None = None,
) -> list[str]:
    """``vllm serve`` as a GPU server runs it: async scheduling and CUDA graphs (vLLM's defaults), the
    TokenFlow scheduler and write-through host offload when ``plugin``; plain vLLM otherwise. ``vllm`` is the
    ``vllm`` executable (or a ``python -m ...`` prefix, split by the caller)."""
    args = [
        vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_name, "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
        "--generation-config", "vllm",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]  # fmt: skip
    if max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if kv_cache_bytes:
        args += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    if gpu_memory_utilization:
        # vLLM 0.26 checks at start-up that this share of the device is free even with a fixed KV size: two
        # servers on one device need it lowered.
        args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if plugin:
        args += ["--scheduling-policy", "priority", "--scheduler-cls", SCHEDULER_ASYNC]
        if host_offload_bytes:
            args += ["--kv-transfer-config", kv_transfer_config(host_offload_bytes, kv_extra)]
    return args + list(extra or [])
