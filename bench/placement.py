"""``tokenflow bench placement``: placements x policies x cluster sizes on identical arrivals (virtual clock).

    tokenflow bench placement --config configs/bench/placement-h100x4.yaml [--engines 2,4,8] [--out DIR]

Every case is one arrival process whose answers are mixed: a share ``long_share`` is long (``long_mean``
tokens), the rest short (``short_mean``), drawn with their own seeded generator so that every placement and
policy serves exactly the same requests. Load scales with the cluster: ``per_engine`` requests per engine.

* ``burst``: ``burst_per_engine`` x N requests at once.
* ``poisson``: Poisson arrivals at ``rps_per_engine`` x N per second for ``duration_s``.
* ``burst-on-load``: the Poisson load, and after ``burst_at_s`` a burst on top of it: the engines are then
  unevenly loaded (different mixes of long and short answers, running or done, buffered or not).
* ``uneven``: ``preload_per_engine`` long answers already on every engine (pinned there, as by another router or
  an earlier deployment: the same count everywhere), read by listeners (``preload_slow_rate``) on the first
  half of the engines and by readers (``preload_fast_rate``) on the rest; then the burst at ``burst_at_s``.
  Counts are even, what the readers need from each engine is not.

Prints a Markdown table and writes ``report.json``: per case, cluster size and policy, each placement's metrics
and its ratios against least-outstanding and round-robin.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from .cluster import run_cluster
from .report import cell, write_json
from .workload import RequestSpec, WorkloadConfig, generate, parse_rates

CASES = ("burst", "poisson", "burst-on-load", "uneven")
PLACEMENTS = "tokenflow,least-outstanding,round-robin,kv-free-first"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenflow bench placement", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of option defaults (configs/bench/placement-*.yaml)")
    p.add_argument("--profile", default="h100-llama3-8b")
    p.add_argument("--engines", default="2,4,8", help="cluster sizes")
    p.add_argument("--placements", default=PLACEMENTS)
    p.add_argument("--policies", default="tokenflow,fcfs")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--burst-per-engine", type=int, default=300)
    p.add_argument("--rps-per-engine", type=float, default=4.0)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--burst-at-s", type=float, default=30.0)
    p.add_argument("--preload-per-engine", type=int, default=200, help="uneven: long answers pinned per engine")
    p.add_argument("--preload-slow-rate", type=float, default=3.5, help="uneven: readers' rate, first half")
    p.add_argument("--preload-fast-rate", type=float, default=20.0, help="uneven: readers' rate, second half")
    p.add_argument("--input-mean", type=float, default=512)
    p.add_argument("--long-mean", type=float, default=2048)
    p.add_argument("--short-mean", type=float, default=256)
    p.add_argument("--long-share", type=float, default=0.3)
    p.add_argument("--rates", default="15:0.4,20:0.6")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tick", type=float, default=0.5)
    p.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute")
    p.add_argument("--out", help="output directory (default bench-results/placement-<time>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {a.dest for a in p._actions}
        unknown = sorted({k.replace("-", "_") for k in data} - known)
        if unknown:
            p.error(f"{args.config}: unknown option(s) {', '.join(unknown)}")
        p.set_defaults(**{k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v)
                          for k, v in data.items()})
        args = p.parse_args(argv)
    return args


def mixed(specs: list[RequestSpec], long_mean: float, long_share: float, seed: int) -> list[RequestSpec]:
    """``specs`` with a ``long_share`` of them made long (about ``long_mean`` tokens; a generator of its own)."""
    rng = random.Random(f"{seed}-long")
    out = []
    for s in specs:
        if rng.random() < long_share:
            s = replace(s, output_tokens=max(16, round(rng.gauss(long_mean, 0.25 * long_mean))))
        out.append(s)
    return out


def case_specs(case: str, n_engines: int, args: argparse.Namespace) -> list[RequestSpec]:
    """The requests of one case for a cluster of ``n_engines`` (identical for every placement and policy)."""
    return case_workload(case, n_engines, args)[0]


def case_workload(case: str, n_engines: int, args: argparse.Namespace) -> tuple[list[RequestSpec], dict[str, int]]:
    """The requests of one case and those pinned to an engine (by index) whatever the placement."""
    base = WorkloadConfig(input_mean=args.input_mean, output_mean=args.short_mean, rates=parse_rates(args.rates),
                          seed=args.seed)
    parts: list[RequestSpec] = []
    if case in ("poisson", "burst-on-load"):
        rps = args.rps_per_engine * n_engines
        parts += generate(base.with_(kind="poisson", n=max(1, round(rps * args.duration_s)), rate_rps=rps))
    pinned: dict[str, int] = {}
    if case == "uneven":
        for e in range(n_engines):
            rate = args.preload_slow_rate if e < n_engines // 2 else args.preload_fast_rate
            # arriving over the first 60 % of the time before the burst: started, buffers built by then
            pre = generate(base.with_(kind="poisson", n=args.preload_per_engine, output_mean=args.long_mean,
                                      rate_rps=args.preload_per_engine / (0.6 * args.burst_at_s),
                                      rates=((rate, 1.0),), seed=args.seed + 100 + e))
            for k, s in enumerate(pre):
                pid = f"pre-{e}-{k:05d}"
                pinned[pid] = e
                parts.append(replace(s, id=pid))
    if case in ("burst", "burst-on-load", "uneven"):
        at = args.burst_at_s if case in ("burst-on-load", "uneven") else 0.0
        burst = generate(base.with_(kind="burst", n=args.burst_per_engine * n_engines, seed=args.seed + 1))
        parts += [replace(s, arrival_s=at) for s in burst]
    if not parts:
        raise ValueError(f"unknown case {case!r}; known: {', '.join(CASES)}")
    parts.sort(key=lambda s: s.arrival_s)
    specs = [s if s.id in pinned else replace(s, id=f"req-{k:06d}") for k, s in enumerate(parts)]
    specs = [s for s in specs if s.id in pinned] + mixed([s for s in specs if s.id not in pinned], args.long_mean,
                                                         args.long_share, args.seed)
    return sorted(specs, key=lambda s: s.arrival_s), pinned


def ttft_p99_floor(specs: list[RequestSpec], n_engines: int, profile: str) -> float:
    """For requests that all arrive at once: no placement gets 99 % of them their first token sooner than the
    smallest 99 % of the prompts take to prefill, back to back in full chunks, spread evenly over the engines,
    with no decoding at all (a lower bound on TTFT P99)."""
    from backends.sim.profile import load_profile

    prompts = sorted(s.prompt_tokens for s in specs)
    k = -(-len(prompts) * 99 // 100)
    return load_profile(profile).chunked_prefill_time(sum(prompts[:k]) // n_engines)


KEYS = ("ttft_p50_s", "ttft_p99_s", "effective_throughput_tps", "throughput_tps", "rebuffer_mean_s",
        "rebuffer_p99_s", "stalled_share", "completed", "requests")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case in [c for c in args.cases.split(",") if c]:
        for n in [int(x) for x in str(args.engines).split(",") if x]:
            specs, pinned = case_workload(case, n, args)
            floor = ttft_p99_floor(specs, n, args.profile) if case == "burst" else None
            for policy in [p for p in args.policies.split(",") if p]:
                for placement in [p for p in args.placements.split(",") if p]:
                    t0 = time.process_time()
                    r = run_cluster(specs, n, placement, policy, args.seed, profile=args.profile, tick_s=args.tick,
                                    engine_preempt=args.engine_preempt, pinned=pinned)
                    row = {"case": case, "engines": n, "policy": policy, "placement": placement,
                           **{k: r.metrics.get(k) for k in KEYS}, "ttft_p99_floor_s": floor, "placed": r.placed,
                           "cpu_s": round(time.process_time() - t0, 1)}
                    rows.append(row)
                    if not args.no_progress:
                        print(f"{case} x{n} {policy}/{placement}: TTFT p99 {row['ttft_p99_s']:.2f} s, effective "
                              f"{row['effective_throughput_tps']:.0f} tok/s ({row['cpu_s']} s cpu)",
                              file=sys.stderr, flush=True)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's TTFT P99 and effective throughput over least-outstanding's and round-robin's (same case)."""
    by = {(r["case"], r["engines"], r["policy"], r["placement"]): r for r in rows}
    for r in rows:
        for base, tag in (("least-outstanding", "lo"), ("round-robin", "rr")):
            b = by.get((r["case"], r["engines"], r["policy"], base))
            if b is None:
                continue
            r[f"ttft_p99_vs_{tag}"] = r["ttft_p99_s"] / b["ttft_p99_s"] if b["ttft_p99_s"] else None
            r[f"eff_vs_{tag}"] = (r["effective_throughput_tps"] / b["effective_throughput_tps"]
                                  if b["effective_throughput_tps"] else None)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("case", "case"), ("N", "engines"), ("policy", "policy"), ("placement", "placement"),
            ("TTFT p50 s", "ttft_p50_s"), ("TTFT p99 s", "ttft_p99_s"), ("p99 floor s", "ttft_p99_floor_s"),
            ("eff. tok/s", "effective_throughput_tps"),
            ("raw tok/s", "throughput_tps"), ("rebuf mean s", "rebuffer_mean_s"), ("rebuf p99 s", "rebuffer_p99_s"),
            ("stalled", "stalled_share"), ("p99 / LO", "ttft_p99_vs_lo"), ("eff / LO", "eff_vs_lo"),
            ("p99 / RR", "ttft_p99_vs_rr"), ("eff / RR", "eff_vs_rr"), ("done", "completed")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    rows = run(args)
    out = Path(args.out) if args.out else Path("bench-results") / f"placement-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(out / "report.json", {"command": "tokenflow bench placement " + " ".join(shlex.quote(a) for a in argv),
                                     "options": vars(args), "rows": rows})
    print(table(rows))
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
