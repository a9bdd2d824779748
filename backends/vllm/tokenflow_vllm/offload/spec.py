"""``TokenFlowOffloadingSpec``: vLLM's CPU offloading spec with a worker that also runs on the CPU build.

Scheduler side (manager, eviction policy, sizing from ``cpu_bytes_to_use``) is the stock
``CPUOffloadingSpec``; only ``get_worker`` differs. Load it with
``"spec_name": "TokenFlowOffloadingSpec", "spec_module_path": "tokenflow_vllm.offload.spec"``.
"""
from __future__ import annotations

from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from tokenflow_vllm.offload.worker import PortableOffloadingWorker


class TokenFlowOffloadingSpec(CPUOffloadingSpec):
    def __init__(self, config):
        super().__init__(config)
        if len(config.groups) != 1:
            # One block id list is copied in every KV tensor: right only when all layers form one group.
            raise ValueError(
                "TokenFlowOffloadingSpec supports models with one KV cache group (no hybrid sliding-window "
                "or Mamba layers); use vLLM's CPUOffloadingSpec for those"
            )
        if self.blocks_per_chunk != 1:
            raise ValueError(
                "TokenFlowOffloadingSpec needs one device block per host chunk; do not set block_size "
                "in kv_connector_extra_config to a multiple of the engine's block size"
            )

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = PortableOffloadingWorker(kv_caches, self.blocks_per_chunk, self.num_chunks)
        return self._worker
