"""Check of ``MergedStores`` over the worker the plugin runs on this machine, with vLLM's own spec classes.

    python backends/vllm/check_merged_stores.py   # CUDA: vLLM's CPUOffloadingWorker; CPU build: the portable one
    python backends/vllm/check_merged_stores.py --layers 64 --page-bytes 32768 --jobs 16   # the 8B shape's decode step

Needs vLLM (its ``GPULoadStoreSpec`` / ``CPULoadStoreSpec``, and on CUDA its worker). Drives the worker the way the
offloading connector does in a decode step: ``--jobs`` one-block stores (one per request whose block filled), then the
completion poll. Checks, then measures:

1. round trip: stores of several steps merged, device blocks zeroed, loaded back into other blocks: bytes identical;
2. ordering (CUDA): blocks written by a kernel on the compute stream just before the step's stores, no host sync:
   the host copies hold the kernel's bytes;
3. cost: the CPU time to submit one step's stores and poll, vLLM's worker alone against it wrapped in
   ``MergedStores`` (alternating steps, median of each; the copies themselves run on side streams and are
   synchronised outside the timed part).

Prints one JSON object; exit status 0 when the checks pass.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.kv_offload.base import CanonicalKVCacheRef, CanonicalKVCaches, CanonicalKVCacheTensor, GPULoadStoreSpec
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenflow_vllm.offload.merged_stores import MergedStores
from tokenflow_vllm.offload.worker import PortableOffloadingWorker


def make_worker(kv: list[torch.Tensor], page: int, host_chunks: int):
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(tensor=t, page_size_bytes=page) for t in kv],
        group_data_refs=[[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=page) for i in range(len(kv))]],
    )
    if current_platform.is_cuda_alike():
        from vllm.v1.kv_offload.cpu.gpu_worker import CPUOffloadingWorker

        return CPUOffloadingWorker(caches, 1, host_chunks), "vllm-cuda"
    return PortableOffloadingWorker(caches, 1, host_chunks), "portable"


def store(w, job_id: int, block: int, index: int, chunk: int) -> None:
    ok = w.submit_store(job_id, GPULoadStoreSpec([block], group_sizes=(1,), block_indices=(index,)),
                        CPULoadStoreSpec([chunk]))  # fmt: skip
    assert ok  # (not around the call: python -O would drop the submission with the assert)


FINISHED: set[int] = set()  # job ids reported finished, by any poll


def poll(w) -> None:
    FINISHED.update(r.job_id for r in w.get_finished())


def drain(w, jobs: set[int], timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not jobs <= FINISHED:
        poll(w)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"jobs {jobs - FINISHED} not finished")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=64, help="KV tensors (the 8B Llama shape: 32 layers x K, V)")
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--page-bytes", type=int, default=16 * 8 * 128 * 2, help="per tensor per block (16 tokens, "
                    "8 KV heads, head 128, bf16)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=16, help="stores per step (256 streams, 16-token blocks)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    a = ap.parse_args()
    cuda = current_platform.is_cuda_alike()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    kv = [torch.randint(-128, 128, (a.blocks, a.page_bytes), dtype=torch.int8, device=dev) for _ in range(a.layers)]
    inner, kind = make_worker(kv, a.page_bytes, a.blocks)
    w = MergedStores(inner)
    out: dict[str, object] = {"worker": kind, "layers": a.layers, "page_bytes": a.page_bytes, "jobs": a.jobs}
    rng = np.random.default_rng(0)

    # 1. round trip: three steps of stores, scattered blocks and chunks
    blocks = rng.permutation(a.blocks // 2)[: 3 * a.jobs].tolist()
    chunks = rng.permutation(a.blocks)[: 3 * a.jobs].tolist()
    before = [t[blocks].clone() for t in kv]
    job = 0
    for step in range(3):
        for k in range(a.jobs):
            i = step * a.jobs + k
            store(w, job, blocks[i], i, chunks[i])
            job += 1
        poll(w)
    drain(w, set(range(job)))
    targets = [a.blocks // 2 + i for i in range(len(blocks))]
    for t in kv:
        t[blocks] = 0
    ok = w.submit_load(job, CPULoadStoreSpec(chunks), GPULoadStoreSpec(targets, group_sizes=(len(targets),),
                                                                       block_indices=(0,)))  # fmt: skip
    assert ok
    drain(w, {job})
    job += 1
    if cuda:
        torch.cuda.synchronize()
    out["round_trip_exact"] = all(torch.equal(b, t[targets]) for b, t in zip(before, kv))
    ok = bool(out["round_trip_exact"])

    if cuda:
        # 2. ordering: the step's stores must read what the compute stream wrote just before
        m = torch.randn(4096, 4096, device=dev)
        for _ in range(3):
            m = m @ m  # keep the compute stream busy so that a racing copy would read stale bytes
            m /= m.norm()
        for t in kv:
            t[: a.jobs] = 77
        ids = list(range(job, job + a.jobs))
        for k, jid in enumerate(ids):
            store(w, jid, k, k, a.blocks - 1 - k)
        poll(w)
        drain(w, set(ids))
        job += a.jobs
        host = inner._store_handler.dst_tensors
        out["store_orders_after_compute"] = all(bool((h[a.blocks - a.jobs :] == 77).all()) for h in host)
        ok &= bool(out["store_orders_after_compute"])

    # 3. cost of a step's submission and poll
    times: dict[str, list[float]] = {"unmerged": [], "merged": []}
    for step in range(2 * a.steps + 20):
        name = "merged" if step % 2 else "unmerged"
        target = w if name == "merged" else inner
        ids = list(range(job, job + a.jobs))
        job += a.jobs
        picks = rng.integers(0, a.blocks, size=a.jobs).tolist()
        t0 = time.perf_counter()
        for k, jid in enumerate(ids):
            store(target, jid, picks[k], k, picks[k])
        poll(target)
        dt = time.perf_counter() - t0
        drain(target, set(ids))
        if step >= 20:  # warm pools of streams, events and descriptor buffers first
            times[name].append(dt)
    for name, xs in times.items():
        out[f"{name}_ms"] = round(1000 * statistics.median(xs), 4)
    out["merged_over_unmerged"] = round(float(out["merged_ms"]) / float(out["unmerged_ms"]), 3)  # type: ignore[arg-type]
    out["merge_stats"] = vars(w.stats)
    out["ok"] = ok
    w.shutdown()
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
