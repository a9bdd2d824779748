"""Standalone check of ``PortableOffloadingWorker``: byte-exact round trips, stream ordering, overlap.

    python backends/vllm/check_offload_worker.py --device cuda   # needs torch + numpy only, not vLLM
    python backends/vllm/check_offload_worker.py --device cpu

Builds fake KV tensors shaped like vLLM's canonical views (per layer ``(num_blocks, page_bytes)`` int8)
and drives the worker the way the offloading connector does (``submit_store`` / ``submit_load`` with block
id lists, ``get_finished`` polling, ``wait`` for a flush). Checks:

1. round trip: blocks stored to host chunks, device blocks scrambled, loaded back into *other* blocks:
   bytes identical (consecutive and scattered ids, so both coalesced and single-block copies run);
2. ordering (CUDA): a store submitted right after a kernel that writes the blocks on the compute stream,
   with no host sync in between, copies the kernel's result (the side stream waits for the compute stream);
3. overlap (CUDA): time of a compute loop alone, of a store alone, and of both at once; prints the overlap.

Exit status 0 when every check passes. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenflow_vllm.offload.worker import PortableOffloadingWorker  # noqa: E402


@dataclass
class _T:
    tensor: torch.Tensor
    page_size_bytes: int


@dataclass
class _KV:
    tensors: list


@dataclass
class _Spec:
    block_ids: np.ndarray


def ids(xs) -> _Spec:
    return _Spec(np.asarray(xs, dtype=np.int64))


def drain(w: PortableOffloadingWorker, jobs: set[int], timeout: float = 60.0) -> dict[int, object]:
    done: dict[int, object] = {}
    t0 = time.monotonic()
    while not jobs <= done.keys():
        for r in w.get_finished():
            done[r.job_id] = r
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"jobs {jobs - done.keys()} not finished")
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--page-bytes", type=int, default=16 * 2 * 8 * 128 * 2, help="per layer per block (default: "
                    "16 tokens, K+V, 8 KV heads, head 128, bf16)")  # fmt: skip
    ap.add_argument("--store-blocks", type=int, default=512, help="blocks per timed store (overlap check)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    if cuda:
        # ints in [-128, 128) straight on the device; fill via float (randint on int8 is slow on some builds)
        kv = [torch.randint(-128, 128, (args.blocks, args.page_bytes), dtype=torch.int8, device=dev)
              for _ in range(args.layers)]  # fmt: skip
    else:
        kv = [torch.randint(-128, 128, (args.blocks, args.page_bytes), dtype=torch.int8) for _ in range(args.layers)]
    w = PortableOffloadingWorker(_KV([_T(t, args.page_bytes) for t in kv]), 1, args.blocks)
    out: dict[str, object] = {"device": str(dev), "layers": args.layers, "page_bytes": args.page_bytes, "ok": True}

    # 1. round trip
    src = list(range(10, 40)) + [100, 7, 300, 301, 302, 55]
    host = list(range(0, 30)) + [500, 33, 900, 901, 902, 31]  # distinct: one chunk per block
    dst = list(range(1000, 1030)) + [60, 61, 62, 1500, 1700, 1701]
    before = [t[src].clone() for t in kv]
    w.submit_store(1, ids(src), ids(host))
    drain(w, {1})
    for t in kv:
        t[dst] = 0
    w.submit_load(2, ids(host), ids(dst))
    drain(w, {2})
    if cuda:
        torch.cuda.synchronize()
    out["round_trip_exact"] = all(torch.equal(b, t[dst]) for b, t in zip(before, kv))
    out["ok"] &= out["round_trip_exact"]

    if cuda:
        # 2. ordering: the store must see the compute stream's write without a host sync
        blocks = list(range(1200, 1264))
        a = torch.randn(4096, 4096, device=dev)
        for _ in range(3):
            a = a @ a  # keep the compute stream busy so a racing copy would read stale bytes
            a /= a.norm()
        for t in kv:
            t[blocks] = 77
        w.submit_store(3, ids(blocks), ids(range(1200, 1264)))
        drain(w, {3})
        out["store_orders_after_compute"] = all(bool((w.host_tensors[i][1200:1264] == 77).all()) for i in range(len(kv)))
        out["ok"] &= out["store_orders_after_compute"]

        # 3. overlap
        n = args.store_blocks
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

        def compute() -> None:
            for _ in range(20):
                b @ b

        def timed(fn) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        compute()
        t_compute = timed(compute)
        job = [10]

        def store() -> None:
            job[0] += 1
            w.submit_store(job[0], ids(range(n)), ids(range(n)))
            w.wait({job[0]})

        store()
        t_store = timed(store)

        def both() -> None:
            job[0] += 1
            w.submit_store(job[0], ids(range(n)), ids(range(n)))
            compute()
            w.wait({job[0]})

        t_both = timed(both)
        drain(w, set())
        nbytes = n * args.page_bytes * args.layers
        out.update(
            compute_ms=1000 * t_compute, store_ms=1000 * t_store, both_ms=1000 * t_both,
            store_gb_per_s=nbytes / t_store / 1e9,
            overlap=(t_compute + t_store - t_both) / min(t_compute, t_store),
        )  # fmt: skip
    w.shutdown()
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
