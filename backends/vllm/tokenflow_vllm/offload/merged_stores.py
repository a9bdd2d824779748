"""``MergedStores``: the KV stores of one engine step submitted to the host as one transfer.

vLLM's offloading connector hands its worker one store job per request whose block filled, so a decode step of
256 streams with 16-token blocks carries about 16 jobs. vLLM's CUDA worker pays per job: two pointer
computations per KV tensor (64 tensors on an 8B Llama), a stream, two events and a batched copy call. On an
H200 at 256 decoding streams that was 32 % of the engine process's busy time (docs/gpu-sittings.md, seventh
sitting). This worker wraps any ``OffloadingWorker`` and queues the stores; the queue goes to the inner worker
as one job when the connector has submitted the step's transfers (``flush_after_submission``), or earlier if
it submits a load, polls completions or waits for a flush; that job's completion is reported as the completion
of each job in it. So the stores start when vLLM's own would: after the forward that wrote their blocks (the
inner worker orders them after the compute stream), beside the next one.

Why queueing is safe: vLLM's scheduler never reuses a block whose store it has not seen complete without first
asking the worker to wait for that job (``jobs_to_flush`` -> ``wait``), and ``wait`` submits the queue before it
waits. Only stores that map one device block to one host chunk in a single KV cache group are merged (the layout
the plugin runs); anything else goes through unchanged, after the queue.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenflow_vllm.offload.worker_api import OffloadingWorker, TransferResult


@dataclass
class MergeStats:
    """What the merging did since start-up (read by the tests and check_merged_stores.py)."""

    jobs_in: int = 0  # store jobs the connector submitted
    jobs_out: int = 0  # store jobs handed to the inner worker
    passed_through: int = 0  # stores not mergeable (several groups, partial chunks)


class MergedStores(OffloadingWorker):
    def __init__(self, inner: Any):
        self.inner = inner
        self.stats = MergeStats()
        self._queue: list[tuple[int, Any, Any]] = []  # (job id, device spec, host spec), submission order
        # Inner job id -> the connector's (job id, blocks) in it. Merged jobs take negative ids: the
        # connector's own count up from 0.
        self._members: dict[int, list[tuple[int, int]]] = {}
        self._merged_into: dict[int, int] = {}  # connector job id -> inner job id, while in flight
        self._next_id = -1

    @staticmethod
    def mergeable(src_spec: Any, dst_spec: Any) -> bool:
        groups = getattr(src_spec, "group_sizes", None)
        return groups is not None and len(groups) == 1 and len(src_spec.block_ids) == len(dst_spec.block_ids)

    # -- OffloadingWorker -------------------------------------------------------------------------

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        self.stats.jobs_in += 1
        if self.mergeable(src_spec, dst_spec):
            self._queue.append((job_id, src_spec, dst_spec))
            return True
        self.flush()
        self.stats.passed_through += 1
        self.stats.jobs_out += 1
        return bool(self.inner.submit_store(job_id, src_spec, dst_spec))

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        self.flush()
        return bool(self.inner.submit_load(job_id, src_spec, dst_spec))

    def get_finished(self) -> list[TransferResult]:
        self.flush()
        out: list[TransferResult] = []
        for r in self.inner.get_finished():
            members = self._members.pop(r.job_id, None)
            if members is None:
                out.append(r)
                continue
            total = sum(n for _, n in members)
            for job_id, n in members:
                del self._merged_into[job_id]
                share = n / total
                out.append(
                    dataclasses.replace(
                        r,
                        job_id=job_id,
                        transfer_size=None if r.transfer_size is None else round(r.transfer_size * share),
                        transfer_time=None if r.transfer_time is None else r.transfer_time * share,
                    )
                )
        return out

    def wait(self, job_ids: set[int]) -> None:
        self.flush()
        self.inner.wait({self._merged_into.get(j, j) for j in job_ids})

    def shutdown(self) -> None:
        self._queue.clear()  # as vLLM's connector drops its unsubmitted stores at shutdown
        self.inner.shutdown()

    # -- the merge --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the queued stores to the inner worker: one job, or the job itself when only one is queued."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        self.stats.jobs_out += 1
        if len(queue) == 1:
            job_id, src, dst = queue[0]
            ok = self.inner.submit_store(job_id, src, dst)
        else:
            src = copy.copy(queue[0][1])
            dst = copy.copy(queue[0][2])
            src.block_ids = np.concatenate([s.block_ids for _, s, _ in queue])
            dst.block_ids = np.concatenate([d.block_ids for _, _, d in queue])
            src.group_sizes = (len(src.block_ids),)
            src.block_indices = (0,)  # one device block per host chunk: no chunk is entered mid-way
            inner_id = self._next_id
            self._next_id -= 1
            self._members[inner_id] = [(job_id, len(s.block_ids)) for job_id, s, _ in queue]
            for job_id, _, _ in queue:
                self._merged_into[job_id] = inner_id
            ok = self.inner.submit_store(inner_id, src, dst)
        # vLLM's workers never refuse a job (its connector asserts success); keep that contract visible here.
        assert ok, "the offloading worker refused a store"


def flush_after_submission(connector_worker_cls: Any) -> None:
    """Make vLLM's offloading connector worker hand a ``MergedStores`` its queue as soon as it has submitted a step's
    transfers (``start_kv_transfers``, before the step's forward is queued). Without this the queue waits for the
    completion poll after the forward, and each store completes a step later than vLLM's own would (a request
    resumed soon after its pause may then find a chunk or two not yet on the host, and recompute them)."""
    orig = connector_worker_cls.start_kv_transfers
    if getattr(orig, "_tokenflow_flushes", False):
        return

    def start_kv_transfers(self: Any, metadata: Any) -> None:
        orig(self, metadata)
        if isinstance(self.worker, MergedStores):
            self.worker.flush()

    start_kv_transfers._tokenflow_flushes = True  # type: ignore[attr-defined]
    connector_worker_cls.start_kv_transfers = start_kv_transfers
