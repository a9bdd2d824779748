"""vLLM's offloading worker interface (``OffloadingWorker``, ``TransferResult``), or stand-ins of the same shape
where vLLM is absent: the standalone worker checks on a bare GPU machine and the unit tests."""
from __future__ import annotations

from dataclasses import dataclass

try:
    from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult
except ImportError:

    class OffloadingWorker:  # type: ignore[no-redef]
        pass

    @dataclass
    class TransferResult:  # type: ignore[no-redef]
        job_id: int
        success: bool
        transfer_size: int | None = None
        transfer_time: float | None = None


__all__ = ["OffloadingWorker", "TransferResult"]
