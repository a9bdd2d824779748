"""The planner's output: a text table per policy, the JSON report and a plot of the search."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .plan import PolicyPlan, Row

COLUMNS = (  # header, metric, format
    ("TTFT p99 s", "ttft_p99_s", "{:.2f}"),
    ("rebuf mean s", "rebuffer_mean_s", "{:.3f}"),
    ("rebuf p99 s", "rebuffer_p99_s", "{:.2f}"),
    ("eff tok/s", "effective_throughput_tps", "{:.0f}"),
    ("eff/engine", "effective_throughput_per_engine_tps", "{:.0f}"),
    ("tok/s", "throughput_tps", "{:.0f}"),
)


def _fmt(fmt: str, v: float) -> str:
    return "nan" if math.isnan(v) else fmt.format(v)


def answer_line(plan: PolicyPlan) -> str:
    if plan.answer is None:
        return f"{plan.policy}: no N up to {plan.max_n} meets every target"
    below = "N-1 = 0 serves nothing" if plan.answer == 1 else f"N-1 = {plan.answer - 1} misses"
    return f"{plan.policy}: {plan.answer} engine{'s' if plan.answer != 1 else ''} ({below})"


def policy_table(plan: PolicyPlan) -> str:
    """Every N tried, ascending: metrics, each target's verdict (+ met, - missed) and the answer's marks.
    Wall times stay out (stderr and the JSON have them): the same seed gives the same table."""
    names = list(plan.rows[0].checks) if plan.rows else []
    head = ["N", *(h for h, _, _ in COLUMNS), *(f"[{i + 1}]" for i in range(len(names))), "all", ""]
    lines = []
    for r in plan.sorted_rows():
        cells = [str(r.n_engines)]
        cells += [_fmt(f, r.metrics.value(k)) for _, k, f in COLUMNS]
        cells += ["+" if r.checks[n] else "-" for n in names]
        cells += ["MET" if r.met else "missed", _mark_text(r)]
        lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    out = [f"policy {plan.policy}"]
    out += [f"  [{i + 1}] {n}" for i, n in enumerate(names)]
    out.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in lines]
    out.append("=> " + answer_line(plan))
    return "\n".join(out)


def _mark_text(r: Row) -> str:
    return {"answer": "<- answer", "answer-1": "<- answer - 1"}.get(r.mark, "")


def render(header: dict[str, Any], plans: list[PolicyPlan]) -> str:
    out = [f"command: {header['command']}"]
    out.append(f"  profile: {header['profile']}; placement: {header['placement']}; seed: {header['seed']}; "
               f"tick: {header['tick_s']} s")
    out.append(f"  workload: {header['workload_text']}")
    out.append(f"  targets: {'; '.join(header['targets'])}")
    out.append("  search: N doubles from 1 until every target is met, then bisects; assumes meeting the targets is "
               "monotone in N")
    for p in plans:
        out += ["", policy_table(p)]
    out += ["", "answer:"] + [f"  {answer_line(p)}" for p in plans]
    return "\n".join(out)


def report_json(header: dict[str, Any], plans: list[PolicyPlan]) -> dict[str, Any]:
    return {**header, "answers": {p.policy: p.answer for p in plans},
            "policies": {p.policy: p.to_json() for p in plans}}


def text_plot(plans: list[PolicyPlan], metric: str = "ttft_p99_s", bound: float | None = None,
              width: int = 50) -> str:
    """One bar per (policy, N) tried, length proportional to ``metric`` (a log-free, dependency-free view)."""
    vals = [r.metrics.value(metric) for p in plans for r in p.rows if not math.isnan(r.metrics.value(metric))]
    top = max(vals + ([bound] if bound is not None else []), default=1.0) or 1.0
    out = [f"{metric} by N ({'|' if bound is not None else ''}{'' if bound is None else f' = target {bound:g}'})"]
    for p in plans:
        for r in p.sorted_rows():
            v = r.metrics.value(metric)
            n = 0 if math.isnan(v) else round(width * v / top)
            bar = list("#" * n + " " * (width - n))
            if bound is not None:
                bar[min(width - 1, round(width * bound / top))] = "|"
            out.append(f"{p.policy:>10} N={r.n_engines:<3} {''.join(bar)} {_fmt('{:.3g}', v)}"
                       f"{'  MET' if r.met else ''}{'  <- answer' if r.mark == 'answer' else ''}")
    return "\n".join(out)


def plot(path: Path, plans: list[PolicyPlan], targets: list[tuple[str, str, float]]) -> Path:
    """One panel per target metric: its value against N for each policy, the bound as a line, the runs that
    met every target filled and the answers circled. PNG with matplotlib (the bench extra), else a text plot."""
    try:
        import matplotlib
    except ImportError:
        txt = path.with_name(path.stem + "-plot.txt")  # beside plan.txt, not over it
        txt.write_text("\n\n".join(text_plot(plans, m, b) for m, _, b in targets) + "\n")
        return txt
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), dpi=110, squeeze=False)
    for ax, (metric, op, bound) in zip(axes[0], targets):
        for p in plans:
            rows = p.sorted_rows()
            xs = [r.n_engines for r in rows]
            ys = [r.metrics.value(metric) for r in rows]
            (line,) = ax.plot(xs, ys, "-", lw=1, label=p.policy)
            for x, y, r in zip(xs, ys, rows):
                ax.plot([x], [y], "o", color=line.get_color(), mfc=line.get_color() if r.met else "white")
                if r.mark == "answer":
                    ax.plot([x], [y], "o", ms=14, mfc="none", color=line.get_color())
        ax.axhline(bound, color="grey", ls="--", lw=1, label=f"target {op} {bound:g}")
        top = max((r.metrics.value(metric) for p in plans for r in p.rows), default=0.0)
        if bound > 0 and top > 50 * bound:  # an overloaded N would flatten the region around the bound
            ax.set_yscale("symlog", linthresh=bound)
        ax.set_ylim(bottom=0)  # every metric here is >= 0
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("engines N")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("tokenflow plan: filled = met every target, ring = answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(out_dir: Path, text: str, data: dict[str, Any], plans: list[PolicyPlan],
          targets: list[tuple[str, str, float]]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.txt").write_text(text + "\n")
    (out_dir / "plan.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return [out_dir / "plan.txt", out_dir / "plan.json", plot(out_dir / "plan.png", plans, targets)]
