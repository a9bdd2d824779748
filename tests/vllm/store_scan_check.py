"""The plugin's filtered write-through scan stores exactly what vLLM's own scan stores, step by step.

Two schedulers of the installed vLLM (``AsyncScheduler`` with the offloading connector's scheduler side, as a
plugin server runs it) take the same requests through the same steps of ``scheduler_harness``'s stand-in engine:
prompts of every length against the chunk size, decoding, requests aborted at different steps (a finished
request's stores are never reported done here, so none is let finish on its own), one with its write-through
capped (``max_offload_tokens``). One has ``tokenflow_vllm.offload.store_scan`` installed. Every
step's store jobs (request, device blocks, host blocks) must be the same in both. Prints one JSON line; exits
non-zero at the first difference.

    python tests/vllm/store_scan_check.py MODEL_DIR
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "vllm"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scheduler_harness as harness
from tokenflow_vllm.launch import kv_transfer_config
from tokenflow_vllm.offload import store_scan
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.request import RequestStatus


def build(model: str, filtered: bool) -> tuple[harness.Engine, list[list[str]]]:
    sched = harness.make_scheduler(model, True, 4096, 64, cls=AsyncScheduler, policy="priority",
                                   max_num_batched_tokens=2048, kv_transfer=kv_transfer_config(1 << 28))  # fmt: skip
    conn = sched.connector.connector_scheduler
    if filtered and not store_scan.install(conn):
        raise SystemExit(json.dumps({"ok": False, "failed": "store_scan.install refused this vLLM's connector"}))
    seen: list[list[str]] = []
    build_jobs = conn._build_store_jobs

    def recording(scheduler_output: Any) -> Any:
        jobs = build_jobs(scheduler_output)
        seen.append(sorted(f"{j.req_id} {j.src_spec!r} {j.dst_spec!r}" for j in jobs.values()))
        return jobs

    conn._build_store_jobs = recording
    return harness.Engine(sched, depth=2), seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    a = ap.parse_args()
    init_none_hash(sha256)
    plain, seen_plain = build(a.model, False)
    filt, seen_filt = build(a.model, True)
    rng = random.Random(7)
    n = 48
    for i in range(n):
        plen = rng.randint(1, 300)
        cap = 100 if i == 5 else None
        for eng in (plain, filt):
            eng.add(f"r{i}", plen, 1500, i + 1, {"max_offload_tokens": cap} if cap is not None else None)
    aborts = {rng.randrange(20, 300): f"r{i}" for i in range(0, n, 4)}
    steps = 300
    for step in range(steps):
        if step in aborts:
            for eng in (plain, filt):
                eng.sched.finish_requests(aborts[step], RequestStatus.FINISHED_ABORTED)
        plain.step()
        filt.step()
        if seen_plain != seen_filt:
            k = next(i for i, (x, y) in enumerate(zip(seen_plain, seen_filt)) if x != y)
            print(json.dumps({"ok": False, "failed": f"store jobs differ at step {k}",
                              "vllm": seen_plain[k], "filtered": seen_filt[k]}))  # fmt: skip
            sys.exit(1)
    stored = sum(len(x) for x in seen_plain)
    print(json.dumps({"ok": stored > n, "steps": steps, "store_jobs": stored, "aborted": len(aborts)}))


if __name__ == "__main__":
    main()
