"""The bench report: JSON with per-policy metrics, ratios against the baseline, and PNG plots."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from .metrics import RequestRecord, buffer_trace, time_series

METRIC_KEYS = (
    "ttft_mean_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "effective_throughput_tps",
    "throughput_tps",
    "rebuffer_mean_s",
    "rebuffer_p99_s",
    "stalled_share",
    "qoe_mean",
    "preemptions",
    "policy_preempts",
    "requests",
    "completed",
)

# The targets, checked against the report (TokenFlow versus fcfs and andes).
TARGETS = (
    ("ttft_p99_s", "fcfs", "<=", 0.2),
    ("effective_throughput_tps", "fcfs", ">=", 1.9),
    ("throughput_tps", "fcfs", ">=", 0.97),
    ("rebuffer_mean_s", "fcfs", "<=", 1.0),
    ("effective_throughput_tps", "andes", ">=", 1.0),
    ("ttft_p99_s", "andes", "<=", 1.0),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
        return None
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def check_targets(policies: dict[str, dict[str, Any]], subject: str = "tokenflow") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if subject not in policies:
        return out
    for key, base, op, factor in TARGETS:
        if base not in policies:
            continue
        a, b = policies[subject].get(key), policies[base].get(key)
        if a is None or b is None:
            continue
        bound = b * factor
        ok = a <= bound + 1e-9 if op == "<=" else a >= bound - 1e-9
        out.append({"metric": key, "versus": base, "rule": f"{subject} {op} {factor} x {base}",
                    "value": a, "baseline": b, "ratio": _ratio(a, b), "met": ok})
    return out


def build_report(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    policies = {name: {k: m.get(k) for k in METRIC_KEYS} | {k: v for k, v in m.items() if k not in METRIC_KEYS}
                for name, m in results.items()}
    return {**meta, "policies": policies, "targets": check_targets(policies)}


def _clean(x: Any) -> Any:
    """JSON has no infinity or NaN: null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=False) + "\n")


def write_json_gz(path: Path, data: Any) -> None:
    """A run's bulky side file (per-request or per-tick records), compact and gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(_clean(data), f, separators=(",", ":"))


def table(report: dict[str, Any]) -> str:
    """A Markdown table of the headline metrics, one row per policy."""
    cols = [("policy", None), ("TTFT mean s", "ttft_mean_s"), ("TTFT p50 s", "ttft_p50_s"),
            ("TTFT p99 s", "ttft_p99_s"),
            ("eff. thpt tok/s", "effective_throughput_tps"), ("thpt tok/s", "throughput_tps"),
            ("rebuffer mean s", "rebuffer_mean_s"), ("rebuffer p99 s", "rebuffer_p99_s"),
            ("stalled share", "stalled_share"), ("QoE", "qoe_mean"),
            ("engine preemptions", "preemptions"), ("policy preempts", "policy_preempts"), ("done", "completed")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for name, m in report["policies"].items():
        lines.append("| " + " | ".join([name] + [cell(m.get(key)) for _, key in cols[1:]]) + " |")
    return "\n".join(lines)


def cell(v: Any) -> str:
    """A table cell: whole numbers from 100 up, two decimals below, "-" for none."""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
    return "-" if v is None else str(v)


def plot(out_dir: Path, runs: dict[str, list[RequestRecord]], *, bin_s: float = 5.0, samples: int = 3) -> list[Path]:
    """TTFT CDF per policy, buffer occupancy of sample requests, throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for name, recs in runs.items():
        ttfts = sorted((r.token_times[0] if r.token_times else math.inf) - r.arrival for r in recs)
        ttfts = [t for t in ttfts if math.isfinite(t)]
        if ttfts:
            ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "ttft_cdf.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(len(runs), 1, figsize=(6, 1.9 * len(runs) + 0.4), dpi=110, sharex=True, squeeze=False)
    for ax, (name, recs) in zip(axes[:, 0], runs.items()):
        picks = [recs[int(k * (len(recs) - 1) / max(samples - 1, 1))] for k in range(min(samples, len(recs)))]
        for r in picks:
            ts, bs = buffer_trace(r, 0.25)
            ax.plot(ts, bs, label=f"{r.id} @{r.rate:g} tok/s", lw=1)
        ax.set_ylabel("buffer (tok)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    paths.append(out_dir / "buffers.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for name, recs in runs.items():
        series = time_series(recs, bin_s)
        line = ax.plot(series["t"], series["throughput_tps"], label=f"{name} raw", lw=1)[0]
        ax.plot(series["t"], series["effective_throughput_tps"], ls="--", color=line.get_color(),
                label=f"{name} effective", lw=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
