"""Recent engine step time and decode/prefill rates, for the state report.

A step is timed from ``schedule()`` to the matching ``update_from_output()``; with async scheduling
steps overlap, so a step is timed from the later of its schedule and the previous step's output.
Exponential moving averages keep the numbers recent without a window buffer.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

ALPHA = 0.1  # weight of the newest step
# The prefill rate is the slope of step time against prompt tokens, fitted over the recent steps that computed at
# least this many (step time = fixed cost + per decoding request + per prompt token): what a recomputation adds
# to the engine's time, which the policy rations. Timing such steps whole also charges their fixed cost and
# decodes to the prompt: on the H200 burst that read 24-36k tok/s mid-run where the steps give ~49k by regression,
# and the policy switched streams ~40 % less than it meant to. Shorter prompt work (a 16-token tail recomputed
# beside 250 decodes) is left out: it hides in the step's memory-bound time and says nothing of a long prompt.
PREFILL_SAMPLE_MIN_TOKENS = 256
PREFILL_SAMPLES = 64  # the fit is over the last this many such steps
PREFILL_FIT_MIN_SAMPLES = 16
PREFILL_FIT_MIN_T = 3.0  # the slope must be this many standard errors above zero, else the whole-step rate
PREFILL_FIT_TRIM = 4.0  # steps this many robust standard deviations off the first fit are refitted without


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


Sample = tuple[int, int, float]  # a step with prompt work: (decoding requests, prompt tokens, seconds)


def _fit(steps: Sequence[Sample]) -> tuple[float, float, float, float] | None:
    """Least squares ``t = a + b * decodes + c * prompt`` (centred sums; ``b`` = 0 when every step had the same
    number of decodes, as in a burst's first prefills): ``(a, b, c, standard error of c)``, or None where ``c``
    cannot be told (prompt sizes all alike, decodes moving with the prompt, too few steps)."""
    n = len(steps)
    md = sum(d for d, _, _ in steps) / n
    mp = sum(p for _, p, _ in steps) / n
    mt = sum(t for _, _, t in steps) / n
    sdd = spp = sdp = sdt = spt = stt = 0.0
    for d, p, t in steps:
        x, y, z = d - md, p - mp, t - mt
        sdd += x * x
        spp += y * y
        sdp += x * y
        sdt += x * z
        spt += y * z
        stt += z * z
    if spp <= 0.0:
        return None
    det = sdd * spp - sdp * sdp
    if sdd <= 0.0:
        b, c = 0.0, spt / spp
        rss, dof, var_scale = stt - c * spt, n - 2, 1.0 / spp
    elif det <= 1e-9 * sdd * spp:
        return None
    else:
        b = (spp * sdt - sdp * spt) / det
        c = (sdd * spt - sdp * sdt) / det
        rss, dof, var_scale = stt - b * sdt - c * spt, n - 3, sdd / det
    if dof <= 0:
        return None
    return mt - b * md - c * mp, b, c, (max(rss, 0.0) / dof * var_scale) ** 0.5


def _prompt_token_slope(steps: Sequence[Sample]) -> tuple[float | None, Sequence[Sample]]:
    """Seconds per prompt token, fitted without the steps that the first fit puts ``PREFILL_FIT_TRIM`` robust
    deviations away (a step held up by a copy or a stall is no measure of prompt cost, and one such step of 300 ms
    among 60 of 15-60 ms turns a least-squares slope); None unless it is ``PREFILL_FIT_MIN_T`` standard errors above
    zero. Also the steps it kept."""
    fit = _fit(steps)
    if fit is None:
        return None, steps
    a, b, c, _ = fit
    res = [t - a - b * d - c * p for d, p, t in steps]
    mid = statistics.median(res)
    # the median absolute deviation, as a standard deviation; never below a timer's resolution
    spread = max(PREFILL_FIT_TRIM * 1.4826 * statistics.median(abs(r - mid) for r in res), 5e-5)
    kept = [s for s, r in zip(steps, res, strict=True) if abs(r - mid) <= spread]
    if len(kept) < len(steps):
        if len(kept) < PREFILL_FIT_MIN_SAMPLES:
            return None, steps
        fit = _fit(kept)
        if fit is None:
            return None, kept
    c, se = fit[2], fit[3]
    return (c if c > 0.0 and c > PREFILL_FIT_MIN_T * se else None), kept


class StepRates:
    def __init__(self) -> None:
        self._inflight: deque[tuple[float, int, int]] = deque()  # (scheduled at, decode, prefill tokens)
        self._last_output: float = 0.0
        self.step_time: float | None = None
        # Steps with no prompt work only: what a decoding request waits per token. A burst's prefill steps are
        # ten times longer and would read as a collapse of decode capacity, right when new requests arrive.
        self.decode_step_time: float | None = None
        self.decode_rate: float | None = None
        # the recent steps with enough prompt work to time it
        self._prefill_steps: deque[Sample] = deque(maxlen=PREFILL_SAMPLES)
        self._any_prefill_rate: float | None = None  # every step with prompt work: only until the first sample

    def on_schedule(self, out: Any) -> None:
        decode = prefill = 0
        spec_tokens = out.scheduled_spec_decode_tokens
        # A decoding request schedules its one sampled token (plus draft tokens); more is prefill (a prompt
        # chunk, or context recomputed after a preemption). Runs every step over every running request.
        if not spec_tokens:  # (counted in C: this runs every step over every running request)
            counts = list(out.num_scheduled_tokens.values())
            ones = counts.count(1)
            decode = ones + counts.count(0)
            prefill = sum(counts) - ones
        else:
            for rid, n in out.num_scheduled_tokens.items():
                if n <= 1 + len(spec_tokens.get(rid, ())):
                    decode += 1
                else:
                    prefill += n
        if decode or prefill:
            self._inflight.append((time.perf_counter(), decode, prefill))

    def on_output(self, scheduler_output: Any) -> None:
        if not scheduler_output.num_scheduled_tokens or not self._inflight:
            return
        t_sched, decode, prefill = self._inflight.popleft()
        now = time.perf_counter()
        dt = now - max(t_sched, self._last_output)
        self._last_output = now
        if dt > 0:
            self.add_step(decode, prefill, dt)

    def add_step(self, decode: int, prefill: int, dt: float) -> None:
        """Account one step of ``dt`` seconds (> 0) with ``decode`` decoding requests and ``prefill`` prompt tokens
        (the simulator and ``calibrate prefill-rates`` feed steps here directly)."""
        self.step_time = _ema(self.step_time, dt)
        if not prefill:
            self.decode_step_time = _ema(self.decode_step_time, dt)
        if decode:
            self.decode_rate = _ema(self.decode_rate, decode / dt)
        if prefill:
            if prefill >= PREFILL_SAMPLE_MIN_TOKENS:
                self._prefill_steps.append((decode, prefill, dt))
            elif not self._prefill_steps:
                self._any_prefill_rate = _ema(self._any_prefill_rate, prefill / dt)

    @property
    def prefill_rate(self) -> float | None:
        """Prompt tokens per second of the engine time they add, from the recent steps with at least
        ``PREFILL_SAMPLE_MIN_TOKENS`` of prompt work: the inverse of the fitted per-token slope, never below those
        steps' whole-step rate (a lower bound: they also pay the fixed cost and their decodes); that rate alone
        while the fit is not yet clear of noise. Before the first such step, from every step with prompt work."""
        steps = self._prefill_steps
        if not steps:
            return self._any_prefill_rate
        slope, kept = _prompt_token_slope(steps) if len(steps) >= PREFILL_FIT_MIN_SAMPLES else (None, steps)
        whole = sum(p for _, p, _ in kept) / sum(t for _, _, t in kept)
        return whole if slope is None or 1.0 / slope < whole else 1.0 / slope

    def report(self) -> dict[str, float | None]:
        return {
            "step_time_s": self.step_time,
            "decode_step_time_s": self.decode_step_time,
            "decode_tokens_per_s": self.decode_rate,
            "prefill_tokens_per_s": self.prefill_rate,
        }


class StepTrace:
    """One JSON line per engine step, for fitting the simulator's step-cost model to a real engine.

    Enabled by ``TOKENFLOW_STEP_TRACE=<path>`` (see scheduler.py). Each line: ``t`` (perf_counter at the
    step's output), ``dt`` (step time, timed as in :class:`StepRates`), ``decode`` (decoding requests),
    ``decode_kv`` (their context lengths summed: the attention term), ``prefill`` (prompt or recomputed
    tokens), ``running`` (requests scheduled). Each line is written as its step ends (line-buffered): a server
    stopped by a signal ends its engine process without exit handlers, and a 64 KiB buffer lost up to ~700 steps
    that way (the last 0.6-3 s of each GPU burst's last run; all of a short run). A write a step costs
    microseconds; tracing is opt-in. The file is appended to: engines started one after another with the same
    path leave their steps one after another (``t`` starts again with each), so give each engine its own path or
    remove the file before it starts (``bench.vllm_gpu burst`` does).
    """

    def __init__(self, path: str) -> None:
        import atexit

        # Open for the engine process's whole life (no block to scope it to): closed, hence flushed, at exit.
        self._f = open(path, "a", buffering=1)  # noqa: SIM115
        self._inflight: deque[tuple[float, int, int, int, int]] = deque()
        self._last_output = 0.0
        atexit.register(self._f.close)

    def on_schedule(self, out: Any, requests: dict[str, Any]) -> None:
        decode = decode_kv = prefill = 0
        for rid, n in out.num_scheduled_tokens.items():
            spec = len(out.scheduled_spec_decode_tokens.get(rid, ()))
            if n <= 1 + spec:
                decode += 1
                req = requests.get(rid)
                decode_kv += req.num_computed_tokens if req is not None else 0  # advanced: includes this token
            else:
                prefill += n
        if decode or prefill:
            self._inflight.append((time.perf_counter(), decode, decode_kv, prefill, len(out.num_scheduled_tokens)))

    def on_output(self, scheduler_output: Any) -> None:
        if not scheduler_output.num_scheduled_tokens or not self._inflight:
            return
        t_sched, decode, decode_kv, prefill, running = self._inflight.popleft()
        now = time.perf_counter()
        dt = now - max(t_sched, self._last_output)
        self._last_output = now
        self._f.write(
            f'{{"t":{now:.6f},"dt":{dt:.6f},"decode":{decode},"decode_kv":{decode_kv},'
            f'"prefill":{prefill},"running":{running}}}\n'
        )
