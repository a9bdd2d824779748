"""Exercise the KV offload copy path on CUDA: device -> pinned host -> device on side streams.

KV-shaped blocks (16 tokens x 32 layers x K,V x 8 KV heads x 128 dims, bf16: 2 MiB a block) are copied on
side streams (torch.cuda.Stream) while a matrix product runs on the main stream; completion is polled through
CUDA events, as the offload worker does, and the data is compared bit for bit. Bandwidth is measured alone and
concurrently, to see how much the copies and the compute overlap. Two device layouts are covered:

- ``block``: a block is one contiguous 2 MiB slab (one copy per run of consecutive blocks);
- ``layer``: vLLM's layout, one cache tensor per layer, so a block is 32 layers x K,V = 64 slabs of 32 KiB
  (one copy each, as vLLM's swap_blocks does).

The host pool is block-major and pinned in both cases. Needs torch and one CUDA GPU; downloads nothing.
From the repository root:

    python3 -m backends.gpu_checks.cuda_offload_check --out offload.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 16
LAYERS = 32
KV_HEADS = 8
HEAD_DIM = 128
DTYPE_BYTES = 2
CHUNK_ELEMS = BLOCK_TOKENS * KV_HEADS * HEAD_DIM  # one layer's K (or V) of one block: 32 KiB
BLOCK_ELEMS = LAYERS * 2 * CHUNK_ELEMS  # 1,048,576 elements
BLOCK_BYTES = BLOCK_ELEMS * DTYPE_BYTES  # 2 MiB
POISON = 0x7FA5  # a NaN bit pattern: never produced by a correct copy of the random source bits


def coalesce(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """Merge (src, dst) block pairs into runs (src_start, dst_start, count) that are consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


class KVPools:
    """A device KV pool in one of two layouts and a pinned, block-major host pool."""

    def __init__(self, torch: Any, n_dev: int, n_host: int, layout: str) -> None:
        if layout not in ("block", "layer"):
            raise ValueError(layout)
        self.torch, self.layout, self.n_dev, self.n_host = torch, layout, n_dev, n_host
        bf16 = torch.bfloat16
        if layout == "block":
            self.dev = torch.empty((n_dev, LAYERS, 2, CHUNK_ELEMS), dtype=bf16, device="cuda")
        else:
            self.dev = torch.empty((LAYERS, 2, n_dev, CHUNK_ELEMS), dtype=bf16, device="cuda")
        self.host = torch.empty((n_host, LAYERS, 2, CHUNK_ELEMS), dtype=bf16, pin_memory=True)
        # Random contents everywhere: timing on zeros can flatter the copy path.
        self.dev.view(torch.int16).random_(-(2**15), 2**15)
        self.host.view(torch.int16).random_(-(2**15), 2**15)

    def _copy(self, dev_ids: list[int], host_ids: list[int], stream: Any, to_host: bool) -> int:
        """Enqueue the copies on `stream`; returns how many copy calls were issued."""
        torch, calls = self.torch, 0
        with torch.cuda.stream(stream):
            if self.layout == "block":
                for s, d, n in coalesce(dev_ids, host_ids):
                    dev, host = self.dev[s : s + n], self.host[d : d + n]
                    (host if to_host else dev).copy_(dev if to_host else host, non_blocking=True)
                    calls += 1
            else:
                for s, d in zip(dev_ids, host_ids, strict=True):
                    for layer in range(LAYERS):
                        for kv in (0, 1):
                            dev, host = self.dev[layer, kv, s], self.host[d, layer, kv]
                            (host if to_host else dev).copy_(dev if to_host else host, non_blocking=True)
                            calls += 1
        return calls

    def enqueue_d2h(self, dev_ids: list[int], host_ids: list[int], stream: Any) -> int:
        return self._copy(dev_ids, host_ids, stream, to_host=True)

    def enqueue_h2d(self, host_ids: list[int], dev_ids: list[int], stream: Any) -> int:
        return self._copy(dev_ids, host_ids, stream, to_host=False)

    def dev_blocks_bits(self, ids: Any) -> Any:
        """The device blocks `ids` (a long tensor on the GPU) as int16 bits, shape [n, LAYERS, 2, CHUNK]."""
        bits = self.dev.view(self.torch.int16)
        return bits[ids] if self.layout == "block" else bits[:, :, ids].permute(2, 0, 1, 3)

    def set_dev_blocks_bits(self, ids: Any, value: Any) -> None:
        bits = self.dev.view(self.torch.int16)
        if self.layout == "block":
            bits[ids] = value
        else:
            bits[:, :, ids] = value.permute(1, 2, 0, 3)


# ----------------------------------------------------------------------------------------------- timing helpers


class Gate:
    """Holds the main stream with a spin kernel so that work enqueued on several streams starts together."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.available = hasattr(torch.cuda, "_sleep")
        self.cycles_per_ms = 1.0e6
        if self.available:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)  # warm-up
            start.record()
            torch.cuda._sleep(50_000_000)
            end.record()
            end.synchronize()
            self.cycles_per_ms = 50_000_000 / max(start.elapsed_time(end), 1e-3)

    def hold(self, ms: float) -> None:
        if self.available:
            self.torch.cuda._sleep(int(self.cycles_per_ms * ms))


@dataclass
class CopyJob:
    name: str
    stream: Any
    enqueue: Callable[[], int]  # enqueues its copies on `stream`, returns the number of copy calls
    nbytes: int


def run_streams(
    torch: Any,
    gate: Gate,
    jobs: list[CopyJob],
    compute: Callable[[], Any] | None = None,
    n_compute: int = 0,
    gate_ms: float = 50.0,
) -> dict[str, Any]:
    """Start `jobs` (side streams) and `n_compute` calls of `compute` (main stream) together; return spans in s.

    Every span is measured from the same gate event to the end event of that stream's work, so concurrent spans
    can be compared directly. `gate_overrun` is true when enqueueing took longer than the gate held the GPU
    (then the streams did not start together and the numbers understate the overlap).
    """
    main = torch.cuda.current_stream()
    torch.cuda.synchronize()
    gate_ev = torch.cuda.Event(enable_timing=True)
    gate.hold(gate_ms)
    gate_ev.record(main)
    t0 = time.perf_counter()
    # Compute first: it enqueues fast, so it starts at the gate even when many small copies take long to enqueue.
    compute_end = None
    if compute is not None and n_compute > 0:
        for _ in range(n_compute):
            compute()
        compute_end = torch.cuda.Event(enable_timing=True)
        compute_end.record(main)
    ends: list[tuple[str, Any, int, int]] = []
    for job in jobs:
        job.stream.wait_event(gate_ev)
        calls = job.enqueue()
        end = torch.cuda.Event(enable_timing=True)
        end.record(job.stream)
        ends.append((job.name, end, job.nbytes, calls))
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    out: dict[str, Any] = {"enqueue_ms": enqueue_ms, "gate_overrun": (not gate.available) or enqueue_ms > gate_ms}
    spans = []
    for name, end, nbytes, calls in ends:
        span = gate_ev.elapsed_time(end) / 1e3
        spans.append(span)
        out[name] = {"span_s": span, "bytes": nbytes, "copy_calls": calls, "gb_per_s": nbytes / span / 1e9}
    if compute_end is not None:
        span = gate_ev.elapsed_time(compute_end) / 1e3
        spans.append(span)
        out["compute"] = {"span_s": span, "n": n_compute, "per_call_s": span / n_compute}
    out["total_s"] = max(spans) if spans else 0.0
    return out


def median_run(torch: Any, gate: Gate, repeats: int, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `make` (one run_streams call) `repeats` times and keep the run whose total span is the median."""
    runs = sorted((make() for _ in range(repeats)), key=lambda r: r["total_s"])
    return runs[len(runs) // 2]


def overlap_summary(alone_copy: dict[str, Any], alone_compute: dict[str, Any], both: dict[str, Any],
                    copy_names: list[str]) -> dict[str, Any]:
    """How much the copies and the compute overlap, from three run_streams results."""
    c_alone = alone_compute["compute"]["span_s"]
    c_both = both["compute"]["span_s"]
    x_alone = max(alone_copy[n]["span_s"] for n in copy_names)
    x_both = max(both[n]["span_s"] for n in copy_names)
    serial = c_alone + x_alone
    hidden = serial - both["total_s"]
    return {
        "compute_alone_s": c_alone,
        "compute_with_copies_s": c_both,
        "compute_slowdown_pct": 100.0 * (c_both / c_alone - 1.0),
        "copy_alone_s": x_alone,
        "copy_with_compute_s": x_both,
        "copy_gb_per_s_alone": {n: alone_copy[n]["gb_per_s"] for n in copy_names},
        "copy_gb_per_s_with_compute": {n: both[n]["gb_per_s"] for n in copy_names},
        # 1.0: the shorter of the two was hidden entirely; 0.0: they ran one after the other.
        "overlap_fraction": max(0.0, min(1.0, hidden / min(c_alone, x_alone))),
        "gate_overrun": both["gate_overrun"] or alone_copy["gate_overrun"],
    }


# ------------------------------------------------------------------------------------------------ bit-exactness


def roundtrip_check(torch: Any, pools: KVPools, n_blocks: int, rng: random.Random, d2h: Any, h2d: Any,
                    compute: Callable[[], Any] | None = None, n_compute: int = 0,
                    deadline_s: float = 60.0) -> dict[str, Any]:
    """Copy random blocks device -> pinned host -> other device blocks on side streams, poll events, compare bits."""
    half = pools.n_dev // 2
    src = rng.sample(range(half), n_blocks)
    dst = rng.sample(range(half, pools.n_dev), n_blocks)
    hst = rng.sample(range(pools.n_host), n_blocks)
    dev = torch.device("cuda")
    src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
    expected = torch.randint(-(2**15), 2**15, (n_blocks, LAYERS, 2, CHUNK_ELEMS), dtype=torch.int16, device=dev)
    pools.set_dev_blocks_bits(src_t, expected)
    pools.set_dev_blocks_bits(dst_t, torch.full_like(expected, POISON))
    host_bits = pools.host.view(torch.int16)
    host_bits[torch.tensor(hst)] = POISON
    torch.cuda.synchronize()

    main = torch.cuda.current_stream()
    compute_done = None
    if compute is not None:
        for _ in range(n_compute):
            compute()
        compute_done = torch.cuda.Event()
        compute_done.record(main)
    t0 = time.perf_counter()
    pools.enqueue_d2h(src, hst, d2h)
    d2h_done = torch.cuda.Event()
    d2h_done.record(d2h)
    h2d.wait_event(d2h_done)  # the reload may only read host slots the offload has finished writing
    pools.enqueue_h2d(hst, dst, h2d)
    h2d_done = torch.cuda.Event()
    h2d_done.record(h2d)
    polls = 0
    while not h2d_done.query():  # the worker's pattern: poll, never block the scheduler thread
        polls += 1
        if time.perf_counter() - t0 > deadline_s:
            raise TimeoutError(f"copies not complete after {deadline_s} s")
    wall = time.perf_counter() - t0
    compute_still_running = compute_done is not None and not compute_done.query()
    host_ok = torch.equal(host_bits[torch.tensor(hst)], expected.cpu())
    dev_ok = torch.equal(pools.dev_blocks_bits(dst_t), expected)
    src_ok = torch.equal(pools.dev_blocks_bits(src_t), expected)
    torch.cuda.synchronize()
    return {
        "layout": pools.layout,
        "blocks": n_blocks,
        "bytes_each_way": n_blocks * BLOCK_BYTES,
        "with_compute": compute is not None,
        "host_bit_exact": bool(host_ok),
        "device_bit_exact": bool(dev_ok),
        "source_untouched": bool(src_ok),
        "event_polls": polls,
        "roundtrip_wall_s": wall,
        "finished_while_compute_ran": bool(compute_still_running),
        "ok": bool(host_ok and dev_ok and src_ok),
    }


# ---------------------------------------------------------------------------------------------------- the check


def copy_jobs(pools: KVPools, rng: random.Random, streams: dict[str, Any], kind: str, n_blocks: int,
              rounds: int = 1, consecutive: bool = False) -> list[CopyJob]:
    """Copy jobs for `kind` in d2h, h2d or bidir; ids random (a worker's usual case) or consecutive."""

    def ids(n: int, pool: int) -> list[int]:
        if consecutive:
            start = rng.randrange(0, pool - n + 1)
            return list(range(start, start + n))
        return rng.sample(range(pool), n)

    def d2h_job(name: str) -> CopyJob:
        pairs = [(ids(n_blocks, pools.n_dev), ids(n_blocks, pools.n_host)) for _ in range(rounds)]
        return CopyJob(name, streams["d2h"], lambda: sum(pools.enqueue_d2h(d, h, streams["d2h"]) for d, h in pairs),
                       n_blocks * rounds * BLOCK_BYTES)

    def h2d_job(name: str) -> CopyJob:
        pairs = [(ids(n_blocks, pools.n_host), ids(n_blocks, pools.n_dev)) for _ in range(rounds)]
        return CopyJob(name, streams["h2d"], lambda: sum(pools.enqueue_h2d(h, d, streams["h2d"]) for h, d in pairs),
                       n_blocks * rounds * BLOCK_BYTES)

    if kind == "d2h":
        return [d2h_job("d2h")]
    if kind == "h2d":
        return [h2d_job("h2d")]
    if kind == "bidir":
        return [d2h_job("d2h"), h2d_job("h2d")]
    raise ValueError(kind)


def measure_copies_with(torch: Any, gate: Gate, pools: KVPools, rng: random.Random, streams: dict[str, Any],
                        compute: Callable[[], Any], compute_name: str, n_blocks: int, rounds: int,
                        kinds: tuple[str, ...] = ("d2h", "h2d", "bidir"), repeats: int = 3) -> dict[str, Any]:
    """Copy bandwidth alone and while `compute` runs on the main stream, for each direction in `kinds`."""
    # Time one compute call so the compute span covers the copies (1.5x the longest copy span alone).
    one = median_run(torch, gate, repeats, lambda: run_streams(torch, gate, [], compute, 5))["compute"]["per_call_s"]
    out: dict[str, Any] = {"compute": compute_name, "compute_call_s": one, "layout": pools.layout,
                           "blocks_per_round": n_blocks, "rounds": rounds}
    for kind in kinds:
        alone = median_run(torch, gate, repeats,
                           lambda: run_streams(torch, gate, copy_jobs(pools, rng, streams, kind, n_blocks, rounds)))
        names = ["d2h", "h2d"] if kind == "bidir" else [kind]
        n_compute = max(3, math.ceil(1.5 * alone["total_s"] / one))
        comp = median_run(torch, gate, repeats, lambda: run_streams(torch, gate, [], compute, n_compute))
        both = median_run(torch, gate, repeats, lambda: run_streams(
            torch, gate, copy_jobs(pools, rng, streams, kind, n_blocks, rounds), compute, n_compute))
        out[kind] = overlap_summary(alone, comp, both, names) | {"n_compute": n_compute}
    return out


def bandwidth_alone(torch: Any, gate: Gate, pools: KVPools, rng: random.Random, streams: dict[str, Any],
                    n_blocks: int, rounds: int, consecutive: bool, repeats: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"layout": pools.layout, "consecutive_ids": consecutive,
                           "blocks_per_round": n_blocks, "rounds": rounds}
    for kind in ("d2h", "h2d", "bidir"):
        r = median_run(torch, gate, repeats, lambda: run_streams(
            torch, gate, copy_jobs(pools, rng, streams, kind, n_blocks, rounds, consecutive)))
        names = ["d2h", "h2d"] if kind == "bidir" else [kind]
        out[kind] = {n: r[n]["gb_per_s"] for n in names} | {
            "copy_calls": sum(r[n]["copy_calls"] for n in names), "gate_overrun": r["gate_overrun"]}
    return out


def environment(torch: Any) -> dict[str, Any]:
    import subprocess

    props = torch.cuda.get_device_properties(0)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": props.name,
           "sm_count": props.multi_processor_count, "total_memory_bytes": props.total_memory}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.current,"
                            "pcie.link.width.current,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable: {exc}"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cuda_offload_check.json", help="where to write the JSON results")
    ap.add_argument("--dev-blocks", type=int, default=1024, help="device pool size in 2 MiB blocks")
    ap.add_argument("--host-blocks", type=int, default=1024, help="pinned host pool size in 2 MiB blocks")
    ap.add_argument("--mm", type=int, default=8192, help="square bf16 matrix product size on the main stream")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the whole script")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    if args.quick:
        args.dev_blocks, args.host_blocks, args.mm = 64, 64, 2048
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    gate = Gate(torch)
    streams = {"d2h": torch.cuda.Stream(), "h2d": torch.cuda.Stream()}
    res: dict[str, Any] = {"schema": 1, "env": environment(torch), "block_bytes": BLOCK_BYTES,
                           "block_shape": [BLOCK_TOKENS, LAYERS, 2, KV_HEADS, HEAD_DIM], "dtype": "bfloat16",
                           "command": " ".join(["python3 -m backends.gpu_checks.cuda_offload_check",
                                                *(argv or sys.argv[1:])]),
                           "gate_available": gate.available}

    a = torch.randn(args.mm, args.mm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.mm, args.mm, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)

    def matmul() -> None:
        torch.mm(a, b, out=c)

    blocks = KVPools(torch, args.dev_blocks, args.host_blocks, "block")
    n_layer = max(16, args.dev_blocks // 4)
    layers = KVPools(torch, n_layer, n_layer, "layer")
    half = args.dev_blocks // 2

    # 1. Correctness: bit-exact round trips, alone and under a running matrix product, both layouts.
    checks = [
        roundtrip_check(torch, blocks, half // 2, rng, streams["d2h"], streams["h2d"]),
        roundtrip_check(torch, blocks, half // 2, rng, streams["d2h"], streams["h2d"], matmul, 200),
        roundtrip_check(torch, layers, n_layer // 4, rng, streams["d2h"], streams["h2d"]),
        roundtrip_check(torch, layers, n_layer // 4, rng, streams["d2h"], streams["h2d"], matmul, 100),
    ]
    res["bit_exact"] = checks

    # 2. Bandwidth alone: random block ids (2 MiB copies), consecutive ids (coalesced), vLLM layer layout.
    res["alone"] = {
        "block_random": bandwidth_alone(torch, gate, blocks, rng, streams, half, 2, consecutive=False),
        "block_consecutive": bandwidth_alone(torch, gate, blocks, rng, streams, half, 2, consecutive=True),
        "layer_random": bandwidth_alone(torch, gate, layers, rng, streams, n_layer // 2, 1, consecutive=False),
    }

    # 3. Concurrent with a matrix product on the main stream.
    mm_flops = 2 * args.mm**3
    res["with_matmul"] = {
        "block_random": measure_copies_with(torch, gate, blocks, rng, streams, matmul, f"mm{args.mm}", half, 2),
        "layer_random": measure_copies_with(torch, gate, layers, rng, streams, matmul, f"mm{args.mm}",
                                            n_layer // 2, 1, kinds=("d2h", "h2d")),
    }
    res["matmul_tflops_alone"] = mm_flops / res["with_matmul"]["block_random"]["compute_call_s"] / 1e12
    res["elapsed_s"] = time.perf_counter() - t_start
    res["ok"] = all(ch["ok"] for ch in checks)

    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print_summary(res)
    return 0 if res["ok"] else 1


def print_summary(res: dict[str, Any]) -> None:
    print(f"device: {res['env']['device']} | {res['env'].get('nvidia_smi')} | torch {res['env']['torch']}")
    for ch in res["bit_exact"]:
        print(f"bit-exact {ch['layout']:5s} blocks={ch['blocks']:4d} with_compute={ch['with_compute']!s:5s} "
              f"ok={ch['ok']} polls={ch['event_polls']} wall={ch['roundtrip_wall_s'] * 1e3:.1f} ms "
              f"overlapped={ch['finished_while_compute_ran']}")
    print("bandwidth alone (GB/s):")
    for name, r in res["alone"].items():
        print(f"  {name:18s} d2h {r['d2h']['d2h']:6.1f}  h2d {r['h2d']['h2d']:6.1f}  "
              f"bidir d2h {r['bidir']['d2h']:6.1f} + h2d {r['bidir']['h2d']:6.1f}")
    print("with matmul on the main stream:")
    for name, r in res["with_matmul"].items():
        for kind in ("d2h", "h2d", "bidir"):
            if kind not in r:
                continue
            s = r[kind]
            bw_a = " + ".join(f"{v:.1f}" for v in s["copy_gb_per_s_alone"].values())
            bw_c = " + ".join(f"{v:.1f}" for v in s["copy_gb_per_s_with_compute"].values())
            print(f"  {name:13s} {kind:5s} copy GB/s alone {bw_a:>13s} concurrent {bw_c:>13s} | "
                  f"matmul slowdown {s['compute_slowdown_pct']:5.1f}% | overlap {s['overlap_fraction']:.2f}"
                  f"{' (gate overrun)' if s['gate_overrun'] else ''}")
    print(f"matmul alone: {res['matmul_tflops_alone']:.0f} TFLOP/s; elapsed {res['elapsed_s']:.1f} s; ok={res['ok']}")


if __name__ == "__main__":
    sys.exit(main())
