"""The plugin's write-through (``tokenflow_vllm.offload.store_scan``) against vLLM's own, step by step.

Two schedulers of the installed vLLM (``AsyncScheduler`` with the offloading connector's scheduler side, as a
plugin server runs it) take the same requests through the same steps of ``scheduler_harness``'s stand-in engine
(which reports every transfer done with the step's output): prompts of every length against the chunk size,
decoding, requests preempted and re-admitted (loading their host copy), requests aborted at different steps, one
with its write-through capped (``max_offload_tokens``). One has ``store_scan`` installed, storing every ``--every``
chunks:

- ``--every 1``: every step's store jobs (request, device blocks, host blocks) must be those of vLLM's own scan;
- ``--every N``: what it stored of each request is what vLLM stored, short of fewer than N chunks at any step and of
  nothing once the request was preempted (the step after the preemption stores its tail), and every request has
  the same computed tokens in both at every step (a re-admitted request finds the same host copy).

Prints one JSON line; exits non-zero at the first difference.

    python tests/vllm/store_scan_check.py MODEL_DIR [--every N]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "vllm"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scheduler_harness as harness
from tokenflow_vllm import compat
from tokenflow_vllm.launch import kv_transfer_config
from tokenflow_vllm.offload import store_scan
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.request import RequestStatus


def build(model: str, every: int) -> tuple[harness.Engine, list[dict[str, list[int]]], list[str]]:
    """An engine whose connector is vLLM's own (``every`` 0) or wrapped by store_scan; with the device blocks each
    step's store jobs copy, per request, and the jobs as text."""
    sched = harness.make_scheduler(model, True, 4096, 64, cls=AsyncScheduler, policy="priority",
                                   max_num_batched_tokens=2048, kv_transfer=kv_transfer_config(1 << 28))  # fmt: skip
    conn = sched.connector.connector_scheduler
    wt = store_scan.install(conn, every) if every else None
    if every and wt is None:
        raise SystemExit(json.dumps({"ok": False, "failed": "store_scan.install refused this vLLM's connector"}))
    if wt is not None:
        preempt = sched._preempt_request

        def preempting(request: Any, *args: Any, **kwargs: Any) -> None:  # (what the plugin's scheduler does)
            wt.preempted(request.request_id, request.num_computed_tokens)
            preempt(request, *args, **kwargs)

        sched._preempt_request = preempting
    blocks: list[dict[str, list[int]]] = []
    jobs: list[str] = []
    build_meta = conn.build_connector_meta

    def recording(scheduler_output: Any) -> Any:
        meta = build_meta(scheduler_output)
        step: dict[str, list[int]] = {}
        for j in meta.store_jobs.values():
            step.setdefault(j.req_id, []).extend(int(b) for b in j.src_spec.block_ids)
        blocks.append(step)
        jobs.append(repr(sorted(f"{j.req_id} {j.src_spec!r} {j.dst_spec!r}" for j in meta.store_jobs.values())))
        return meta

    conn.build_connector_meta = recording
    return harness.Engine(sched, depth=2), blocks, jobs


def fail(what: str, **detail: Any) -> None:
    print(json.dumps({"ok": False, "failed": what, **detail}))
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--every", type=int, default=1)
    a = ap.parse_args()
    init_none_hash(sha256)
    plain, blocks_plain, jobs_plain = build(a.model, 0)
    filt, blocks_filt, jobs_filt = build(a.model, a.every)
    engines = (plain, filt)
    rng = random.Random(7)
    n = 48
    for i in range(n):
        plen = rng.randint(1, 300)
        cap = 100 if i == 5 else None
        for eng in engines:
            eng.add(f"r{i}", plen, 1500, i + 1, {"max_offload_tokens": cap} if cap is not None else None)
    aborts = {rng.randrange(20, 300): f"r{i}" for i in range(0, n, 4)}
    preempts = {rng.randrange(20, 300): f"r{i}" for i in range(1, n, 3)}
    stored = {"plain": Counter(), "filtered": Counter()}  # request -> device blocks stored so far
    steps, preempted, tails = 300, 0, set()
    resumes: dict[int, str] = {}
    for step in range(steps):
        if step in aborts:
            for eng in engines:
                eng.sched.finish_requests(aborts[step], RequestStatus.FINISHED_ABORTED)
        rid = preempts.get(step)
        if rid is not None and all(eng.sched.requests.get(rid) in eng.sched.running for eng in engines):
            for eng in engines:  # as the plugin holds a running request between steps: out of every queue
                req = eng.sched.requests[rid]
                eng.sched.running.remove(req)
                eng.sched._preempt_request(req, time.monotonic())
                compat.dequeue(eng.sched, req)
            preempted += 1
            tails.add(rid)
            resumes[step + 6] = rid
        rid = resumes.pop(step, None)
        if rid is not None and rid in plain.sched.requests:
            for eng in engines:  # resumed: back at the head of the queue, to load its host copy
                compat.enqueue_front(eng.sched, eng.sched.requests[rid])
        k = len(jobs_plain)
        plain.step()
        filt.step()
        if a.every == 1:
            if jobs_plain != jobs_filt:
                k = next(i for i, (x, y) in enumerate(zip(jobs_plain, jobs_filt)) if x != y)
                fail(f"store jobs differ at step {k}", vllm=jobs_plain[k], filtered=jobs_filt[k])
            continue
        for name, seen in (("plain", blocks_plain), ("filtered", blocks_filt)):
            for s in seen[k:]:
                for r, b in s.items():
                    stored[name][r] += len(b)
        for r in set(stored["plain"]) | set(stored["filtered"]):
            lag = stored["plain"][r] - stored["filtered"][r]
            held = r in tails
            if not 0 <= lag < a.every or (held and lag):
                fail(f"step {step}: request {r} has {stored['filtered'][r]} blocks stored, vLLM's own "
                     f"{stored['plain'][r]}", preempted_just_before=held)  # fmt: skip
        tails.clear()
        for r, req in plain.sched.requests.items():
            other = filt.sched.requests.get(r)
            if other is None or other.num_computed_tokens != req.num_computed_tokens:
                fail(f"step {step}: request {r} computed {req.num_computed_tokens} tokens with vLLM's own "
                     f"write-through, {other and other.num_computed_tokens} with the plugin's")  # fmt: skip
    jobs = sum(len(x) for x in blocks_plain)
    print(json.dumps({"ok": jobs > n and preempted > 5, "every": a.every, "steps": steps, "store_jobs": jobs,
                      "store_jobs_plugin": sum(len(x) for x in blocks_filt), "aborted": len(aborts),
                      "preempted": preempted}))  # fmt: skip


if __name__ == "__main__":
    main()
