"""The scheduler thread's time per decode step: vLLM's own scheduler against the TokenFlow plugin's, piece by piece.

    <vllm venv>/bin/python backends/vllm/bench_step_cost.py MODEL_DIR [--streams 256] [--rounds 7] [--json out.json]

On a GPU server with async scheduling the scheduler's Python work overlaps the forward pass, until it does not:
this measures that work alone, on any build (no model runs). Each variant is a real scheduler of the installed
vLLM built from a real ``VllmConfig`` (the tiny local model, no weights), driven through the engine core's batch
queue of two steps by the stand-in model of ``tests/vllm/scheduler_harness.py``; ``--streams`` requests with
512-token prompts are prefilled, then only decode steps are timed (``schedule`` + ``update_from_output``).

Variants, each adding one thing the plugin's server runs beside vLLM's defaults:

- ``plain``: vLLM's AsyncScheduler, first-come-first-served (a plain ``vllm serve``);
- ``priority``: the same with ``--scheduling-policy priority`` (the plugin's servers use it for the ``priority``
  command);
- ``offload``: plus the offloading connector's scheduler side (write-through to host: which blocks to store,
  every step);
- ``plugin``: the TokenFlow scheduler on top (tracking, rates, the state read the gateway makes every 0.25 s,
  counted here once every 15 steps, a 16 ms step's share), writing every chunk through as it fills (its default);
- ``plugin-every4``: the same, writing chunks through 4 at a time (``tokenflow_store_every_chunks`` 4).

Rounds alternate the variants (each round runs every variant's steps in a new order) so that drift of a shared
machine falls on all; the result is the median of each variant's per-round mean step time.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests" / "vllm"))
import scheduler_harness as harness  # noqa: E402  (the stand-in engine)
import vllm  # noqa: E402
from tokenflow_vllm.launch import kv_transfer_config  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import init_none_hash  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

PROMPT = 512
STATE_EVERY = 15  # steps between state reads: the gateway's 0.25 s tick at ~16 ms a step (H200, 256 streams)


def build(model: str, variant: str, streams: int) -> harness.Engine:
    kvt = kv_transfer_config(1 << 30) if variant in ("offload", "plugin", "plugin-every4") else None
    if variant == "plugin-every4":  # the plugin writing chunks through 4 at a time
        cfg = json.loads(kvt)
        cfg["kv_connector_extra_config"]["tokenflow_store_every_chunks"] = 4
        kvt = json.dumps(cfg)
    cls = None if variant.startswith("plugin") else AsyncScheduler
    policy = "fcfs" if variant == "plain" else "priority"
    blocks = streams * (PROMPT + 4096) // harness.BLOCK + 64
    sched = harness.make_scheduler(model, True, blocks, streams, cls=cls, policy=policy,
                                   max_num_batched_tokens=8192, kv_transfer=kvt)  # fmt: skip
    eng = harness.Engine(sched, depth=2)
    for i in range(streams):
        eng.add(f"{variant}-{i}", PROMPT, 100_000, seed=i + 1)
    while any(r.is_prefill_chunk or r.num_computed_tokens < PROMPT for r in sched.requests.values()):
        eng.step()  # the prompts, then every stream decodes
    for _ in range(50):  # warm: allocation patterns settle, the host tier starts taking blocks
        eng.step()
    return eng


def timed_steps(eng: harness.Engine, variant: str, n: int, step0: int) -> float:
    """Mean seconds per decode step over ``n`` steps (each Engine.step of a full batch queue is one)."""
    t0 = time.perf_counter()
    for k in range(n):
        eng.step()
        if variant.startswith("plugin") and (step0 + k) % STATE_EVERY == 0:
            eng.state()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the tiny model's directory (config and tokenizer; no weights are loaded)")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", default="plain,priority,offload,plugin")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    init_none_hash(sha256)
    variants = a.variants.split(",")
    engines = {v: build(a.model, v, a.streams) for v in variants}
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    rng = random.Random(0)
    for r in range(a.rounds):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            per_round[v].append(timed_steps(engines[v], v, a.steps, r * a.steps))
    base = statistics.median(per_round[variants[0]])
    res: dict[str, Any] = {"vllm": vllm.__version__, "streams": a.streams, "steps": a.steps, "rounds": a.rounds,
                           "variants": {}}
    print(f"{a.streams} decoding streams, {a.rounds} rounds of {a.steps} steps; scheduler time per step, median "
          f"of the rounds' means (vLLM {vllm.__version__})")
    print(f"| variant | per step µs | vs {variants[0]} |")
    print("|---|---|---|")
    for v in variants:
        med = statistics.median(per_round[v])
        res["variants"][v] = {"step_us_median": round(med * 1e6, 1),
                              "rounds_us": [round(x * 1e6, 1) for x in per_round[v]]}  # fmt: skip
        print(f"| {v} | {med * 1e6:.0f} | {med / base:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
