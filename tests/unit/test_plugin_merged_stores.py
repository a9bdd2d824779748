"""The vLLM plugin's ``MergedStores`` (backends/vllm/tokenflow_vllm/offload/merged_stores.py): one step's KV stores
reach the offloading worker as one job, each store is still reported complete under its own id, nothing is copied
to the wrong host chunk, and a flush wait or a load never overtakes a queued store. Driven the way vLLM's
connector drives its worker, over a recording worker that copies bytes between numpy "device" and "host" arrays,
with the interface's stand-ins (vLLM is not installed here). The real engine runs the
same class under every test in tests/vllm (the CPU build's worker) and the GPU sittings (vLLM's CUDA worker)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = 8  # bytes per block


sys.path.insert(0, str(ROOT / "backends" / "vllm"))
from tokenflow_vllm.offload import merged_stores as M  # noqa: E402  (imports nothing from vLLM when it is absent)


class DeviceSpec:
    """Shaped like vLLM's GPULoadStoreSpec."""

    def __init__(self, ids: list[int], group_sizes: tuple[int, ...] | None = None, block_indices=(3,)):
        self.block_ids = np.array(ids, dtype=np.int64)
        self.group_sizes = (len(ids),) if group_sizes is None else group_sizes
        self.block_indices = block_indices


class HostSpec:
    def __init__(self, ids: list[int]):
        self.block_ids = np.array(ids, dtype=np.int64)


class RecordingWorker:
    """Copies at submission; a job is seen by one poll and reported finished by the next, in submission order
    (as a GPU copy completes after the call that submitted it)."""

    def __init__(self) -> None:
        self.device = np.arange(64 * PAGE, dtype=np.int64).reshape(64, PAGE)
        self.host = np.full((64, PAGE), -1, dtype=np.int64)
        self.calls: list[tuple] = []
        self.pending: list[int] = []  # submitted since the last poll
        self.ready: list[int] = []  # finished at the next poll
        self.shut = False

    def submit_store(self, job_id, src, dst) -> bool:
        self.calls.append(("store", job_id, src.block_ids.tolist(), dst.block_ids.tolist(), tuple(src.group_sizes)))
        if len(src.block_ids) == len(dst.block_ids):  # else a chunk of several blocks: not modelled here
            self.host[dst.block_ids] = self.device[src.block_ids]
        self.pending.append(job_id)
        return True

    def submit_load(self, job_id, src, dst) -> bool:
        self.calls.append(("load", job_id, src.block_ids.tolist(), dst.block_ids.tolist()))
        self.device[dst.block_ids] = self.host[src.block_ids]
        self.pending.append(job_id)
        return True

    def get_finished(self):
        done, self.ready, self.pending = self.ready, self.pending, []
        return [M.TransferResult(j, True, 1000, 0.002) for j in done]

    def wait(self, job_ids) -> None:
        self.calls.append(("wait", sorted(job_ids)))

    def shutdown(self) -> None:
        self.shut = True


def test_a_steps_stores_go_out_as_one_job_and_come_back_as_theirs() -> None:
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    assert w.submit_store(0, DeviceSpec([5, 6]), HostSpec([10, 11]))
    assert w.submit_store(1, DeviceSpec([20]), HostSpec([40]))
    assert w.submit_store(2, DeviceSpec([7]), HostSpec([2]))
    assert inner.calls == []  # queued until the connector does something else
    results = w.get_finished()  # submits the queue, then polls
    assert [c[:5] for c in inner.calls] == [("store", -1, [5, 6, 20, 7], [10, 11, 40, 2], (4,))]
    assert results == []
    results = w.get_finished()
    assert [r.job_id for r in results] == [0, 1, 2]
    assert [r.transfer_size for r in results] == [500, 250, 250]  # the merged job's bytes, split by blocks
    assert sum(r.transfer_time for r in results) == pytest.approx(0.002)
    assert all(r.success for r in results)
    assert (inner.host[[10, 11, 40, 2]] == inner.device[[5, 6, 20, 7]]).all()
    assert (np.delete(inner.host, [10, 11, 40, 2], axis=0) == -1).all()
    assert w.stats == M.MergeStats(jobs_in=3, jobs_out=1, passed_through=0)


def test_a_lone_store_keeps_its_own_id_and_spec() -> None:
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    src = DeviceSpec([9], block_indices=(12,))
    w.submit_store(4, src, HostSpec([1]))
    w.get_finished()
    assert inner.calls == [("store", 4, [9], [1], (1,))]
    assert [r.job_id for r in w.get_finished()] == [4]


def test_the_submitted_specs_are_not_modified() -> None:
    w = M.MergedStores(RecordingWorker())
    a, b = DeviceSpec([1, 2], block_indices=(7,)), DeviceSpec([3], block_indices=(9,))
    w.submit_store(0, a, HostSpec([0, 1]))
    w.submit_store(1, b, HostSpec([2]))
    w.get_finished()
    assert a.block_ids.tolist() == [1, 2] and a.group_sizes == (2,) and a.block_indices == (7,)
    assert b.block_ids.tolist() == [3] and b.block_indices == (9,)


def test_a_flush_wait_submits_the_queue_first_and_waits_on_the_merged_job() -> None:
    """vLLM asks the worker to wait for a store (``jobs_to_flush``) before it reuses the store's blocks: the queued
    store must be on its way first, and the wait must cover the job it was merged into."""
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    w.submit_store(7, DeviceSpec([1]), HostSpec([1]))
    w.submit_store(8, DeviceSpec([2]), HostSpec([2]))
    w.wait({8, 99})
    assert inner.calls[0][:2] == ("store", -1)
    assert inner.calls[1] == ("wait", [-1, 99])  # unknown ids go through: the inner worker ignores them
    assert inner.host[2].tolist() == inner.device[2].tolist()


def test_a_load_never_overtakes_a_queued_store() -> None:
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    w.submit_store(0, DeviceSpec([3]), HostSpec([30]))
    w.submit_store(1, DeviceSpec([4]), HostSpec([31]))
    w.submit_load(2, HostSpec([30, 31]), DeviceSpec([50, 51]))
    assert [c[0] for c in inner.calls] == ["store", "load"]
    assert (inner.device[[50, 51]] == inner.device[[3, 4]]).all()
    assert sorted(r.job_id for r in (w.get_finished() + w.get_finished())) == [0, 1, 2]


def test_stores_it_cannot_merge_pass_through_in_order() -> None:
    """Several KV cache groups (hybrid models) or a device block that is part of a larger host chunk: block id lists
    cannot simply be concatenated, so such a store goes to the inner worker as it is, after the queue."""
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    w.submit_store(0, DeviceSpec([1]), HostSpec([1]))
    w.submit_store(1, DeviceSpec([2]), HostSpec([2]))
    w.submit_store(2, DeviceSpec([5, 6], group_sizes=(1, 1), block_indices=(0, 0)), HostSpec([5, 6]))
    w.submit_store(3, DeviceSpec([7, 8]), HostSpec([7]))  # two device blocks, one host chunk
    assert [c[1] for c in inner.calls] == [-1, 2, 3]
    assert sorted(r.job_id for r in (w.get_finished() + w.get_finished())) == [0, 1, 2, 3]
    assert w.stats == M.MergeStats(jobs_in=4, jobs_out=3, passed_through=2)


def test_jobs_of_later_steps_merge_apart_and_finish_apart() -> None:
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    w.submit_store(0, DeviceSpec([1]), HostSpec([1]))
    w.submit_store(1, DeviceSpec([2]), HostSpec([2]))
    w.get_finished()
    w.submit_store(2, DeviceSpec([3]), HostSpec([3]))
    w.submit_store(3, DeviceSpec([4]), HostSpec([4]))
    done = w.get_finished()  # step 1's job finishes; step 2's is submitted
    assert [c[1] for c in inner.calls] == [-1, -2]
    assert [r.job_id for r in done] == [0, 1]
    assert [r.job_id for r in w.get_finished()] == [2, 3]
    w.wait({0, 1, 2, 3})  # all finished: the ids reach the inner worker unmapped
    assert inner.calls[-1] == ("wait", [0, 1, 2, 3])


def test_shutdown_drops_the_queue_as_vllm_drops_unsubmitted_stores() -> None:
    inner = RecordingWorker()
    w = M.MergedStores(inner)
    w.submit_store(0, DeviceSpec([1]), HostSpec([1]))
    w.shutdown()
    assert inner.calls == [] and inner.shut


class ConnectorWorker:
    """Shaped like vLLM's OffloadingConnectorWorker: the step's deferred stores, then its loads."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.stores: list[tuple] = []

    def start_kv_transfers(self, metadata) -> None:
        for job_id, src, dst in self.stores:
            self.worker.submit_store(job_id, src, dst)
        self.stores.clear()


def test_the_queue_goes_out_when_the_connector_has_submitted_the_steps_transfers() -> None:
    """Stores start when vLLM's own would, before the step's forward is queued, not at the completion poll after it
    (a step later: a request resumed soon after its pause would find its last chunks not yet on the host)."""
    M.flush_after_submission(ConnectorWorker)
    wrapped = ConnectorWorker.start_kv_transfers
    M.flush_after_submission(ConnectorWorker)  # installed once per process, whatever the number of specs built
    assert ConnectorWorker.start_kv_transfers is wrapped
    inner = RecordingWorker()
    conn = ConnectorWorker(M.MergedStores(inner))
    conn.stores = [(0, DeviceSpec([1]), HostSpec([1])), (1, DeviceSpec([2]), HostSpec([2]))]
    conn.start_kv_transfers(None)
    assert [c[:2] for c in inner.calls] == [("store", -1)]
    conn.start_kv_transfers(None)  # nothing queued: nothing submitted
    assert len(inner.calls) == 1
    plain = RecordingWorker()
    other = ConnectorWorker(plain)  # not merged: unaffected
    other.stores = [(5, DeviceSpec([3]), HostSpec([3]))]
    other.start_kv_transfers(None)
    assert [c[:2] for c in plain.calls] == [("store", 5)]
