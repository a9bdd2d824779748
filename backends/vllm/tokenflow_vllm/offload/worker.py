"""A portable KV offloading worker: device blocks <-> host chunks, one host tensor per device KV tensor.

vLLM's own ``CPUOffloadingWorker`` refuses to start on the CPU platform, so this worker serves both:

- **CUDA**: every transfer is enqueued on a side stream (one per direction) after
  ``wait_stream(compute)``, so a store reads KV only after the forward that wrote it, and a load writes
  blocks only after the compute stream's earlier work on them (e.g. zeroing). The copies then overlap
  the following forward passes. Completion is polled with CUDA events (``get_finished``) and waited on
  only for a preemption flush (``wait``). Host memory is pinned so the DMA engine copies asynchronously.
- **CPU** (and any other device): plain synchronous copies; a job is finished when ``submit_*`` returns.

Layout: the connector hands one int8 view ``(num_blocks, page_bytes)`` per KV tensor. The host keeps
``(num_chunks, page_bytes * blocks_per_chunk)`` per tensor; with ``blocks_per_chunk == 1`` (what the
spec enforces) a chunk is one device block, so a transfer is a list of (device block, host chunk) pairs.
Consecutive pairs are coalesced into slice copies.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenflow_vllm.offload.worker_api import OffloadingWorker, TransferResult

log = logging.getLogger("tokenflow_vllm.offload")


def copy_runs(src_ids: np.ndarray, dst_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Coalesce paired block ids into (src_start, dst_start, length) runs of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


@dataclass
class _Pending:
    job_id: int
    num_bytes: int
    start: Any  # torch.cuda.Event (CUDA) or float wall time (CPU)
    end: Any


class PortableOffloadingWorker(OffloadingWorker):
    def __init__(self, kv_caches: Any, blocks_per_chunk: int, num_host_chunks: int):
        """``kv_caches``: vLLM's ``CanonicalKVCaches`` (or anything with ``.tensors``, each having
        ``.tensor`` and ``.page_size_bytes``)."""
        if blocks_per_chunk != 1:
            raise ValueError("PortableOffloadingWorker needs blocks_per_chunk == 1 (one host chunk per block)")
        self.device_tensors: list[torch.Tensor] = []
        self.host_tensors: list[torch.Tensor] = []
        first = kv_caches.tensors[0].tensor
        self.cuda = first.is_cuda
        for t in kv_caches.tensors:
            dev = t.tensor.view(torch.int8).view(-1, t.page_size_bytes)
            host = torch.zeros((num_host_chunks, t.page_size_bytes), dtype=torch.int8, pin_memory=self.cuda)
            self.device_tensors.append(dev)
            self.host_tensors.append(host)
        self.bytes_per_block = sum(t.page_size_bytes for t in kv_caches.tensors)
        log.info(
            "TokenFlow offload worker: %d KV tensors, %d host chunks (%.1f MiB), %s copies",
            len(self.host_tensors),
            num_host_chunks,
            num_host_chunks * self.bytes_per_block / 2**20,
            "side-stream CUDA" if self.cuda else "synchronous",
        )
        # CUDA: one stream per direction keeps each direction's jobs in submission order.
        self._streams = {"store": torch.cuda.Stream(), "load": torch.cuda.Stream()} if self.cuda else {}
        self._pending: deque[_Pending] = deque()  # CUDA jobs in flight, by submission order
        self._events: dict[int, Any] = {}  # job id -> end event (CUDA)
        self._done: list[TransferResult] = []  # CPU jobs, finished at submission

    # -- the copies -------------------------------------------------------------------------------

    def _copy(self, to_host: bool, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
        """Enqueue (CUDA) or perform (CPU) the copies; return the number of bytes moved."""
        assert len(src_ids) == len(dst_ids), (len(src_ids), len(dst_ids))
        runs = copy_runs(src_ids, dst_ids)
        for dev, host in zip(self.device_tensors, self.host_tensors):
            src, dst = (dev, host) if to_host else (host, dev)
            for s, d, n in runs:
                dst[d : d + n].copy_(src[s : s + n], non_blocking=self.cuda)
        return len(src_ids) * self.bytes_per_block

    def _submit(self, job_id: int, to_host: bool, src_ids: np.ndarray, dst_ids: np.ndarray) -> bool:
        if not self.cuda:
            t0 = time.perf_counter()
            nbytes = self._copy(to_host, src_ids, dst_ids)
            self._done.append(TransferResult(job_id, True, nbytes, time.perf_counter() - t0))
            return True
        stream = self._streams["store" if to_host else "load"]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Order after everything already queued on the compute stream: the forward that wrote the KV
        # (store) or earlier writes to the destination blocks (load).
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            start.record(stream)
            nbytes = self._copy(to_host, src_ids, dst_ids)
            end.record(stream)
        self._pending.append(_Pending(job_id, nbytes, start, end))
        self._events[job_id] = end
        return True

    # -- OffloadingWorker -------------------------------------------------------------------------

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        """Device blocks ``src_spec.block_ids`` -> host chunks ``dst_spec.block_ids``."""
        return self._submit(job_id, True, src_spec.block_ids, dst_spec.block_ids)

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        """Host chunks ``src_spec.block_ids`` -> device blocks ``dst_spec.block_ids``."""
        return self._submit(job_id, False, src_spec.block_ids, dst_spec.block_ids)

    def get_finished(self) -> list[TransferResult]:
        out, self._done = self._done, []
        # Streams are per direction, so jobs can finish out of submission order across directions:
        # poll them all, not only the head.
        still: deque[_Pending] = deque()
        while self._pending:
            p = self._pending.popleft()
            if p.end.query():
                out.append(TransferResult(p.job_id, True, p.num_bytes, p.start.elapsed_time(p.end) * 1e-3))
                self._events.pop(p.job_id, None)
            else:
                still.append(p)
        self._pending = still
        return out

    def wait(self, job_ids: set[int]) -> None:
        for jid in job_ids:
            ev = self._events.get(jid)
            if ev is not None:
                ev.synchronize()

    def shutdown(self) -> None:
        for p in self._pending:
            p.end.synchronize()
        self._pending.clear()
        self._events.clear()
        self.host_tensors.clear()
        self.device_tensors.clear()
