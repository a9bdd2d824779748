"""Where the slowest first tokens of an HTTP run waited, and what the policy said about it meanwhile.

``python -m bench.tail RUN_DIR [--policy tokenflow] [--share 0.05]`` reads a ``tokenflow bench http`` run kept
with ``--gateway-log-level info`` (the GPU burst keeps one per policy): ``report.json`` (the run's clock against
the wall clock), ``stream-phases-LABEL.json.gz`` (each request's phases) and ``gateway-LABEL.log[.gz]`` (the
policy's ``"tick"`` lines), LABEL being the run's file name (bench/runs.py; ``--policy`` takes the run as
``--policies`` wrote it, e.g. ``tokenflow:first_token_grace_s=1``). For the slowest ``share`` of first tokens it
prints the mean seconds per phase before the first token and, over the time they were outside the engine
(``gateway`` or ``held``), which admission limit the ticks named (``admit_limit``) and how often admitted requests
found no slot (``deferred_new``). This is the question the tenth GPU sitting left open: which limit holds a
burst's tail out of the engine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .http import ttft_spans
from .runs import run_label

OUTSIDE = ("gateway", "held")  # phases before the engine has the request


@dataclass(slots=True)
class TailReport:
    """The slowest first tokens of one policy's run."""

    requests: int  # how many were looked at (the slowest share)
    ttft_s: float  # their mean time to first token
    phase_s: dict[str, float] = field(default_factory=dict)  # mean seconds per phase before the first token
    ticks_outside: int = 0  # policy tick lines logged while any of them was outside the engine
    limits: dict[str, int] = field(default_factory=dict)  # those ticks by admit_limit ("" = none named)
    deferred_ticks: int = 0  # those ticks with admitted requests that found no slot or device memory

    def lines(self) -> list[str]:
        out = [f"slowest {self.requests} first tokens: mean TTFT {self.ttft_s:.2f} s"]
        out += [f"  {p}: {s:.2f} s" for p, s in sorted(self.phase_s.items(), key=lambda kv: -kv[1])]
        if self.ticks_outside:
            named = ", ".join(f"{k or 'none'} {v}" for k, v in sorted(self.limits.items(), key=lambda kv: -kv[1]))
            out.append(f"  ticks while outside the engine: {self.ticks_outside} (admit_limit: {named}; "
                       f"admitted but no slot: {self.deferred_ticks})")
        else:
            out.append("  no policy tick lines while outside the engine (no log, or a policy without tick reports)")
        return out


def phases_before_first_token(req: dict[str, Any]) -> list[tuple[float, float, str]]:
    """``(start, end, phase)`` on the run's clock from the request's arrival to its first token (:func:`ttft_spans`
    over its recorded phase changes), empty spans left out."""
    first = req.get("first_token")
    if first is None:
        return []
    return [s for s in ttft_spans(req["arrival"], first, req.get("phases", ())) if s[1] > s[0]]


def tail_report(phases: Sequence[dict[str, Any]], ticks: Sequence[dict[str, Any]], share: float = 0.05) -> TailReport:
    """The slowest ``share`` of ``phases`` (stream-phases records) by TTFT, with the ``ticks`` (policy tick records,
    ``t`` on the same clock as the phases) that fell while any of them was outside the engine."""
    done = [r for r in phases if r.get("first_token") is not None]
    done.sort(key=lambda r: r["first_token"] - r["arrival"], reverse=True)
    slow = done[:max(1, math.ceil(share * len(done)))] if done else []
    totals: dict[str, float] = {}
    outside: list[tuple[float, float]] = []
    for r in slow:
        for a, b, p in phases_before_first_token(r):
            totals[p] = totals.get(p, 0.0) + (b - a)
            if p in OUTSIDE:
                outside.append((a, b))
    n = len(slow)
    rep = TailReport(requests=n, ttft_s=sum(r["first_token"] - r["arrival"] for r in slow) / n if n else 0.0,
                     phase_s={p: s / n for p, s in totals.items()})
    for tick in ticks:
        t = float(tick["t"])
        if any(a <= t < b for a, b in outside):
            rep.ticks_outside += 1
            limit = str(tick.get("admit_limit") or "")
            rep.limits[limit] = rep.limits.get(limit, 0) + 1
            rep.deferred_ticks += 1 if tick.get("deferred_new") else 0
    return rep


def tick_lines(log_lines: Iterable[str], t0_epoch: float) -> list[dict[str, Any]]:
    """The gateway's ``"tick"`` log lines (JSON), with ``t`` on the run's clock (``ts`` minus ``t0_epoch``)."""
    out = []
    for line in log_lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("msg") == "tick" and isinstance(obj.get("ts"), (int, float)):
            out.append({**obj, "t": obj["ts"] - t0_epoch})
    return out


def _open_text(path: Path) -> list[str]:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode().splitlines()


def report_run(run_dir: Path, policy: str, share: float) -> TailReport:
    report = json.loads((run_dir / "report.json").read_text())
    machine = report["policies"][policy].get("machine") or {}
    if "t0_epoch" not in machine:
        raise SystemExit(f"{run_dir}: the report has no machine.t0_epoch (runs before 2026-12-04 did not keep it)")
    label = run_label(policy)
    phases = json.loads(gzip.decompress((run_dir / f"stream-phases-{label}.json.gz").read_bytes()))
    logs = [p for p in (run_dir / f"gateway-{label}.log", run_dir / f"gateway-{label}.log.gz") if p.exists()]
    ticks = tick_lines(_open_text(logs[0]), machine["t0_epoch"]) if logs else []
    return tail_report(phases, ticks, share)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--policy", default="tokenflow", help="the run, as --policies wrote it (default tokenflow)")
    ap.add_argument("--share", type=float, default=0.05, help="the slowest share of first tokens (default 5 %%)")
    args = ap.parse_args(argv)
    print("\n".join(report_run(args.run_dir, args.policy, args.share).lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
