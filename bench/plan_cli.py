"""``tokenflow plan``: how many engines each policy needs to meet latency, stall and throughput targets.

    tokenflow plan --config configs/plan/h100-poisson.yaml [--out DIR] [--json]
    tokenflow plan --profile h100-llama3-8b --workload poisson --n 800 --rate-rps 20 --ttft-p99-s 2 ...

``--config`` is a YAML file whose keys are the option names with ``_`` (targets also as a ``targets:``
mapping); options on the command line win. Prints one table per policy (every N tried, its metrics, each
target's verdict, the answer and N - 1 marked) or, with ``--json``, the report as JSON. ``--out DIR``
writes plan.txt, plan.json and the plot. One line per evaluation goes to stderr while it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.placement import make_placement
from gateway.policy import make_policy
from gateway.policy.knobs import parse_overrides

from .plan import TARGET_METRICS, Metrics, PolicyPlan, Row, Target, make_targets, search
from .plan_eval import DEFAULT_PLACEMENT, PlanWorkload, evaluate
from .plan_report import render, report_json, write
from .workload import WorkloadConfig, generate, parse_rates


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenflow plan", description="Engines each policy needs to meet targets "
                                "(virtual-clock simulation, docs/planning.md).")
    p.add_argument("--config", help="YAML file of option defaults (configs/plan/*.yaml)")
    p.add_argument("--profile", default="h100-llama3-8b", help="hardware profile (configs/profiles name or path)")
    p.add_argument("--policies", default="fcfs,tokenflow", help="comma-separated policies to plan for")
    p.add_argument("--seed", type=int, default=1, help="workload seed: the same seed gives the same table")
    p.add_argument("--max-n", type=int, default=64, help="largest engine count to try")
    p.add_argument("--start", type=int, default=1, help="engine count the doubling starts from")
    p.add_argument("--tick", type=float, default=0.5, help="policy tick interval (s)")
    p.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute")
    p.add_argument("--placement", default=DEFAULT_PLACEMENT,
                   help="how the simulated gateway places requests on the engines (placement.strategy)")
    p.add_argument("--knob", action="append", default=[], metavar="POLICY.NAME=VALUE", help="override a policy knob")
    w = p.add_argument_group("arrivals")
    w.add_argument("--workload", choices=("burst", "poisson", "gamma", "trace"), default="poisson")
    w.add_argument("--n", type=int, default=400, help="requests (the burst size for burst)")
    w.add_argument("--rate-rps", type=float, default=10.0, help="mean arrivals/s (poisson, gamma)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma: squared CV of gaps (1 = Poisson)")
    w.add_argument("--trace", help="CSV trace: arrival_s,input_tokens,output_tokens,rate")
    w.add_argument("--input-mean", type=float, default=512)
    w.add_argument("--input-std", type=float, default=None, help="default: 25%% of the mean")
    w.add_argument("--output-mean", type=float, default=1024)
    w.add_argument("--output-std", type=float, default=None, help="default: 25%% of the mean")
    w.add_argument("--rates", default="15:0.4,20:0.6", help="reader-rate mix rate:weight,... (tok/s; or "
                   "reading/listening)")
    t = p.add_argument_group("targets (at least one)")
    for name, (_, op) in TARGET_METRICS.items():
        t.add_argument("--" + name.replace("_", "-"), type=float, default=None, metavar="X",
                       help=f"target: {name} {op} X")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the report as JSON instead of the tables")
    o.add_argument("--out", help="write plan.txt, plan.json and the plot of the search here")
    o.add_argument("--no-progress", action="store_true", help="no per-run lines on stderr")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.config:
        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            p.error(f"{args.config}: {e}")
        if not isinstance(data, dict):
            p.error(f"{args.config}: want a mapping of option names to values")
        targets = data.pop("targets", None) or {}
        if not isinstance(targets, dict):
            p.error(f"{args.config}: targets must be a mapping of target name to bound")
        data.update(targets)
        known = {a.dest for a in p._actions}
        unknown = sorted({k.replace("-", "_") for k in data} - known)
        if unknown:
            p.error(f"{args.config}: unknown option(s) {', '.join(unknown)}")
        p.set_defaults(**{k.replace("-", "_"): v for k, v in data.items()})
        args = p.parse_args(argv)
    if args.max_n < 1 or not 1 <= args.start <= args.max_n:
        p.error("need 1 <= --start <= --max-n")
    from backends.sim.profile import ProfileError, load_profile

    try:
        load_profile(args.profile)  # a wrong name fails here, with the known ones, before any run
    except ProfileError as e:
        p.error(str(e))
    try:
        args.policy_list = [pol.strip() for pol in str(args.policies).split(",") if pol.strip()]
        if not args.policy_list:
            raise ValueError("--policies names no policy")
        for pol in args.policy_list:
            make_policy(pol, **_knobs(args.knob).get(pol, {}))  # unknown policy or knob: refused now
        make_placement(args.placement)  # unknown placement: refused now
        args.targets = make_targets({k: getattr(args, k) for k in TARGET_METRICS if getattr(args, k) is not None})
        args.rates_mix = parse_rates(str(args.rates))
        generate(plan_workload(args).workload)  # bad sizes, rates or trace: refused before any run
    except (ValueError, TypeError, OSError) as e:
        p.error(str(e))
    return args


def _knobs(items: list[str]) -> dict[str, dict[str, float]]:
    try:
        return parse_overrides(items)
    except ValueError as e:
        raise SystemExit(f"tokenflow plan: {e}") from None


def plan_workload(args: argparse.Namespace) -> PlanWorkload:
    wl = WorkloadConfig(kind=args.workload, n=args.n, rate_rps=args.rate_rps, burstiness=args.burstiness,
                        input_mean=args.input_mean, input_std=args.input_std, output_mean=args.output_mean,
                        output_std=args.output_std, rates=args.rates_mix, trace=args.trace, seed=args.seed)
    return PlanWorkload(args.profile, wl, tick_s=args.tick, engine_preempt=args.engine_preempt,
                        knobs=_knobs(args.knob), placement=args.placement)


def _workload_text(wl: WorkloadConfig) -> str:
    if wl.kind == "trace":
        arrivals = f"trace {wl.trace}"
    elif wl.kind == "burst":
        arrivals = f"burst of {wl.n}"
    else:
        arrivals = f"{wl.kind} {wl.n} requests at {wl.rate_rps:g}/s" + (
            f" (burstiness {wl.burstiness:g})" if wl.kind == "gamma" else "")
    mix = ", ".join(f"{r:g} tok/s x{w:g}" for r, w in wl.rates)
    return (f"{arrivals}; prompt ~{wl.input_mean:g}, answer ~{wl.output_mean:g} tokens; readers {mix}")


def header(args: argparse.Namespace, argv: Sequence[str], pw: PlanWorkload) -> dict[str, Any]:
    return {
        "command": "tokenflow plan " + " ".join(shlex.quote(a) for a in argv),
        "profile": pw.profile,
        "placement": pw.placement,
        "seed": args.seed,
        "tick_s": pw.tick_s,
        "engine_preempt": pw.engine_preempt,
        "knobs": pw.knobs,
        "max_n": args.max_n,
        "workload": {k: getattr(pw.workload, k) for k in pw.workload.__dataclass_fields__},
        "workload_text": _workload_text(pw.workload),
        "targets": [t.describe() for t in args.targets],
        "search": "exponential from --start, then bisection; assumes meeting the targets is monotone in N",
    }


def _progress_line(row: Row) -> None:
    m = row.metrics
    missed = "; missed: " + ", ".join(k for k, ok in row.checks.items() if not ok) if not row.met else ""
    print(f"plan: {row.policy} N={row.n_engines} {row.wall_s:.1f}s {'met' if row.met else 'missed'}"
          f" (ttft p99 {m.ttft_p99_s:.2f}s, rebuffer mean {m.rebuffer_mean_s:.3f}s,"
          f" eff {m.effective_throughput_tps:.0f} tok/s{missed})", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, pw: PlanWorkload) -> list[PolicyPlan]:
    def evaluator(policy: str) -> Callable[[int], Metrics]:
        return lambda n: evaluate(pw, n, policy, args.seed)

    return [search(pol, evaluator(pol), args.targets, max_n=args.max_n, start=args.start,
                   progress=None if args.no_progress else _progress_line)
            for pol in args.policy_list]


def _plot_targets(targets: list[Target]) -> list[tuple[str, str, float]]:
    return [(TARGET_METRICS[t.name][0], t.op, t.bound) for t in targets]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    pw = plan_workload(args)
    head = header(args, argv, pw)
    plans = run(args, pw)
    text = render(head, plans)
    data = report_json(head, plans)
    if args.out:
        paths = write(Path(args.out), text, data, plans, _plot_targets(args.targets))
        print("plan: wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
