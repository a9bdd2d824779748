"""``TokenFlowOffloadingSpec``: vLLM's CPU offloading spec, with held requests' host KV pinned, on every build.

Load it with ``"spec_name": "TokenFlowOffloadingSpec", "spec_module_path": "tokenflow_vllm.offload.spec"``.

- Scheduler side: the stock ``CPUOffloadingSpec`` manager (sizing from ``cpu_bytes_to_use``), whose eviction
  policy may be ``PinnedLRU``. vLLM 0.32+ load it through ``cache_policy_module_path``; 0.26 knows only its
  built-in policies, so importing this module (which vLLM's spec factory does before it builds the manager)
  adds ``PinnedLRU`` to that table.
- Worker side: on CUDA, vLLM's own ``CPUOffloadingWorker`` (batched copies on side streams, pinned host
  memory). vLLM refuses to start that worker on the CPU platform, so there the portable worker of this
  package copies synchronously. Either is wrapped in ``MergedStores`` (one transfer for a step's stores)
  unless ``tokenflow_merge_stores`` is false in kv_connector_extra_config.
"""
from __future__ import annotations

import logging

from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import CanonicalKVCaches, OffloadingWorker
from vllm.v1.kv_offload.cpu import manager as _cpu_manager
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from tokenflow_vllm.compat import spec_host_chunks
from tokenflow_vllm.offload.merged_stores import MergedStores, flush_after_submission
from tokenflow_vllm.offload.policy import PinnedLRU
from tokenflow_vllm.offload.worker import PortableOffloadingWorker

_policies = getattr(_cpu_manager, "_CACHE_POLICIES", None)
if _policies is not None:  # vLLM 0.26: a fixed table of policies by name
    _policies.setdefault("PinnedLRU", PinnedLRU)


log = logging.getLogger("tokenflow_vllm.offload")

MERGE_STORES_KEY = "tokenflow_merge_stores"  # in kv_connector_extra_config; default true


class TokenFlowOffloadingSpec(CPUOffloadingSpec):
    _outer_worker: OffloadingWorker | None = None  # what get_worker returned: built once

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._outer_worker is not None:
            return self._outer_worker
        if current_platform.is_cuda_alike():
            worker = super().get_worker(kv_caches)
        else:
            self._check_portable()
            worker = PortableOffloadingWorker(kv_caches, self.blocks_per_chunk, spec_host_chunks(self))
        merge = self.extra_config.get(MERGE_STORES_KEY, True)
        if not isinstance(merge, bool):
            raise ValueError(f"{MERGE_STORES_KEY} must be true or false, got {merge!r}")
        # Merging concatenates block id lists: right for one KV cache group, one device block per host chunk.
        if merge and len(self.config.groups) == 1 and self.blocks_per_chunk == 1:
            from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import OffloadingConnectorWorker

            flush_after_submission(OffloadingConnectorWorker)
            worker = MergedStores(worker)
        log.info("TokenFlow offload: %s worker, %s", type(getattr(worker, "inner", worker)).__name__,
                 "a step's stores merged" if isinstance(worker, MergedStores) else "stores not merged")
        self._outer_worker = worker
        return worker

    def _check_portable(self) -> None:
        if len(self.config.groups) != 1:
            # One block id list is copied in every KV tensor: right only when all layers form one group.
            raise ValueError(
                "the portable offloading worker (vLLM's CPU build) supports models with one KV cache group "
                "(no hybrid sliding-window or Mamba layers)"
            )
        if self.blocks_per_chunk != 1:
            raise ValueError(
                "the portable offloading worker needs one device block per host chunk; do not set block_size "
                "in kv_connector_extra_config to a multiple of the engine's block size"
            )
