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


def abort_while_readmitted(model: str) -> None:
    """A request held in the middle of its prompt (its blocks freed, the chunks it computed stored), then tried for
    re-admission with the device full (the connector clears its block ids then and it stays waiting), then aborted,
    as a client that gives up does. The next step must go on: vLLM 0.26's own connector would store its prompt up to
    the end, asserts there, and the engine core dies; the plugin's write-through stores nothing more of it and
    forgets it. Prints one JSON line, with what vLLM's own did."""
    outcome: dict[str, Any] = {}
    for name, every in (("vllm", 0), ("plugin", 1)):
        # 40 blocks of 16 tokens: r0 (160 tokens, 10 blocks), then four of 140 (9 blocks each) fill the device.
        # (prompts in chunks of 64 tokens: a prompt takes several steps)
        sched = harness.make_scheduler(model, True, 40, 64, cls=AsyncScheduler, policy="priority",
                                       max_num_batched_tokens=64, kv_transfer=kv_transfer_config(1 << 28))
        conn = sched.connector.connector_scheduler
        if every and store_scan.install(conn, every) is None:
            fail("store_scan.install refused this vLLM's connector")
        eng = harness.Engine(sched, depth=2)
        eng.add("r0", 160, 1000, 1)
        req = sched.requests["r0"]
        while req.num_computed_tokens < 64:  # part of its prompt computed, and those chunks stored
            eng.step()
        if req.num_computed_tokens >= 160:
            fail("r0 computed its whole prompt before it was held", computed=req.num_computed_tokens)
        sched.running.remove(req)  # held, as the plugin holds a request between steps
        sched._preempt_request(req, time.monotonic())
        compat.dequeue(sched, req)
        for i in range(4):
            eng.add(f"f{i}", 140, 1000, i + 2)
        for _ in range(12):
            eng.step()
        compat.enqueue_front(sched, req)  # resumed: its host copy would load, but no blocks are free
        for _ in range(4):
            eng.step()
        status = conn._req_status.get("r0")
        if req not in sched.running and status is not None and not any(g.block_ids for g in status.group_states):
            outcome[f"{name}_readmission_failed"] = True
        sched.finish_requests("r0", RequestStatus.FINISHED_ABORTED)
        stored_after: list[str] = []
        build_meta = conn.build_connector_meta

        def recording(scheduler_output: Any, build_meta: Any = build_meta, stored_after: list = stored_after) -> Any:
            meta = build_meta(scheduler_output)
            stored_after.extend(j.req_id for j in meta.store_jobs.values())
            return meta

        conn.build_connector_meta = recording
        try:
            for _ in range(4):
                eng.step()
            outcome[name] = "went on"
        except AssertionError as e:
            outcome[name] = f"AssertionError {e}".strip()
        outcome[f"{name}_stored_r0_after_abort"] = "r0" in stored_after
        outcome[f"{name}_forgot_r0"] = "r0" not in conn._req_status
    ok = (outcome.get("plugin_readmission_failed") is True and outcome["plugin"] == "went on"
          and not outcome["plugin_stored_r0_after_abort"] and outcome["plugin_forgot_r0"])
    print(json.dumps({"ok": ok, **outcome}))
    if not ok:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--abort-while-readmitted", action="store_true", help="the scenario of abort_while_readmitted")
    a = ap.parse_args()
    init_none_hash(sha256)
    if a.abort_while_readmitted:
        abort_while_readmitted(a.model)
        return
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
