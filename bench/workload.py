"""Workloads: when requests arrive, how long their prompts and answers are, and how fast they are read.

Four arrival patterns (a burst of ``n`` at once; Poisson at ``rate_rps``; Gamma-distributed gaps whose
squared coefficient of variation is ``burstiness`` — 1 is Poisson, larger is burstier; replay of a CSV
trace), normally distributed input and output lengths, and consumption rates drawn from a weighted mix.
Everything is drawn from one seeded generator, so a (config, seed) pair always gives the same requests.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

Kind = Literal["burst", "poisson", "gamma", "trace"]

# Named consumption classes (tokens/s). Reading and listening speeds are Andes' reference values.
RATE_CLASSES = {"reading": 4.8, "listening": 3.3}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    id: str
    arrival_s: float  # offset from the start of the run
    prompt_tokens: int
    output_tokens: int  # max_tokens: the engine generates exactly this many
    rate: float  # tokens/s the client declares
    true_rate: float | None = None  # tokens/s it really reads (None: as declared)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    kind: Kind = "burst"
    n: int = 100  # requests (burst size for "burst"); a trace gives its own count unless n is smaller
    rate_rps: float = 5.0  # mean arrival rate for poisson / gamma
    burstiness: float = 1.0  # gamma: squared coefficient of variation of the gaps (1 = Poisson)
    input_mean: float = 512
    input_std: float | None = None  # None: 25% of the mean
    output_mean: float = 1024
    output_std: float | None = None
    min_tokens: int = 16
    max_input_tokens: int = 8192
    max_output_tokens: int = 8192
    rates: tuple[tuple[float, float], ...] = ((15.0, 0.4), (20.0, 0.6))  # (tokens/s, weight)
    trace: str | None = None
    seed: int = 0
    # Reader behaviour: this share of the clients reads at slow_factor times its declared rate.
    slow_share: float = 0.0
    slow_factor: float = 0.5

    def with_(self, **changes: Any) -> WorkloadConfig:
        return replace(self, **changes)


def parse_rates(text: str) -> tuple[tuple[float, float], ...]:
    """``"15:0.4,20:0.6"`` or ``"reading:0.5,listening:0.5"`` or ``"20"`` -> ((rate, weight), ...)."""
    out: list[tuple[float, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        rate = RATE_CLASSES.get(name.strip()) or float(name)
        w = float(weight) if weight else 1.0
        if not (rate > 0 and w > 0):
            raise ValueError(f"bad rate mix entry {part!r}: rate and weight must be > 0")
        out.append((rate, w))
    if not out:
        raise ValueError("empty rate mix")
    return tuple(out)


def _normal_int(rng: random.Random, mean: float, std: float | None, lo: int, hi: int) -> int:
    sd = 0.25 * mean if std is None else std
    return int(min(hi, max(lo, round(rng.gauss(mean, sd) if sd > 0 else mean))))


def _pick_rate(rng: random.Random, mix: tuple[tuple[float, float], ...]) -> float:
    total = sum(w for _, w in mix)
    x = rng.random() * total
    for rate, w in mix:
        x -= w
        if x < 0:
            return rate
    return mix[-1][0]


def _arrivals(cfg: WorkloadConfig, rng: random.Random) -> list[float]:
    if cfg.kind == "burst":
        return [0.0] * cfg.n
    if cfg.rate_rps <= 0:
        raise ValueError("rate_rps must be > 0")
    if cfg.kind == "poisson":
        gaps = [rng.expovariate(cfg.rate_rps) for _ in range(cfg.n)]
    elif cfg.kind == "gamma":
        if cfg.burstiness <= 0:
            raise ValueError("burstiness must be > 0")
        shape = 1.0 / cfg.burstiness  # CV^2 = 1 / shape
        scale = 1.0 / (cfg.rate_rps * shape)  # mean gap 1 / rate
        gaps = [rng.gammavariate(shape, scale) for _ in range(cfg.n)]
    else:
        raise ValueError(f"unknown workload kind {cfg.kind!r}")
    t, out = 0.0, []
    for i, g in enumerate(gaps):
        if i:  # the first request arrives at 0
            t += g
        out.append(t)
    return out


def load_trace(path: str | Path) -> list[tuple[float, int, int, float]]:
    """CSV with header ``arrival_s,input_tokens,output_tokens,rate``; rows sorted by arrival on return."""
    rows: list[tuple[float, int, int, float]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"arrival_s", "input_tokens", "output_tokens", "rate"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: trace needs columns {', '.join(sorted(need))}")
        for line, row in enumerate(reader, start=2):
            try:
                a, i, o = float(row["arrival_s"]), int(row["input_tokens"]), int(row["output_tokens"])
                r = float(row["rate"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            if a < 0 or i < 1 or o < 1 or not r > 0 or not math.isfinite(a):
                raise ValueError(f"{path}:{line}: arrival >= 0, tokens >= 1 and rate > 0 required")
            rows.append((a, i, o, r))
    rows.sort(key=lambda x: x[0])
    return rows


def generate(cfg: WorkloadConfig) -> list[RequestSpec]:
    """The requests of a workload, sorted by arrival; identical for identical (config, seed)."""
    specs = _generate(cfg)
    if cfg.slow_share <= 0:
        return specs
    if not (0 < cfg.slow_share <= 1 and cfg.slow_factor > 0):
        raise ValueError("slow_share must be in (0, 1] and slow_factor > 0")
    # Its own generator, so the requests themselves are the same with or without slow readers.
    rng = random.Random(f"{cfg.seed}-readers")
    return [replace(s, true_rate=s.rate * cfg.slow_factor) if rng.random() < cfg.slow_share else s for s in specs]


def _generate(cfg: WorkloadConfig) -> list[RequestSpec]:
    rng = random.Random(cfg.seed)
    if cfg.kind == "trace":
        if not cfg.trace:
            raise ValueError("trace workload needs a trace path")
        rows = load_trace(cfg.trace)
        if cfg.n and cfg.n < len(rows):
            rows = rows[: cfg.n]
        t0 = rows[0][0] if rows else 0.0
        return [RequestSpec(f"req-{k:06d}", a - t0, i, o, r) for k, (a, i, o, r) in enumerate(rows)]
    if cfg.n < 1:
        raise ValueError("n must be >= 1")
    arrivals = _arrivals(cfg, rng)
    specs = []
    for k, a in enumerate(arrivals):
        p = _normal_int(rng, cfg.input_mean, cfg.input_std, cfg.min_tokens, cfg.max_input_tokens)
        o = _normal_int(rng, cfg.output_mean, cfg.output_std, cfg.min_tokens, cfg.max_output_tokens)
        specs.append(RequestSpec(f"req-{k:06d}", a, p, o, _pick_rate(rng, cfg.rates)))
    return specs
