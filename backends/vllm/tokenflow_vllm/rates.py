"""Recent engine step time and decode/prefill rates, for the state report.

A step is timed from ``schedule()`` to the matching ``update_from_output()``; with async scheduling
steps overlap, so a step is timed from the later of its schedule and the previous step's output.
Exponential moving averages keep the numbers recent without a window buffer.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

ALPHA = 0.1  # weight of the newest step
# The prefill rate is timed on steps that mostly compute prompt: at least this many prompt tokens, and more than
# the step's decoding requests. A step that recomputes a 16-token tail beside 250 decodes costs little more than a
# decode-only step; timed whole as prefill it reads as a rate ten times too low (3-4k tok/s in the H200 burst, whose
# steps give 49k by regression), and the policy priced every switch that much too high.
PREFILL_SAMPLE_MIN_TOKENS = 256
PREFILL_SAMPLES = 16  # the rate is over the last this many such steps (tokens over their time)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


class StepRates:
    def __init__(self) -> None:
        self._inflight: deque[tuple[float, int, int]] = deque()  # (scheduled at, decode, prefill tokens)
        self._last_output: float = 0.0
        self.step_time: float | None = None
        # Steps with no prompt work only: what a decoding request waits per token. A burst's prefill steps are
        # ten times longer and would read as a collapse of decode capacity, right when new requests arrive.
        self.decode_step_time: float | None = None
        self.decode_rate: float | None = None
        self._prefill_steps: deque[tuple[int, float]] = deque(maxlen=PREFILL_SAMPLES)  # (prompt tokens, seconds)
        self._any_prefill_rate: float | None = None  # every prefill step: only until one mostly prefills

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
        if dt <= 0:
            return
        self.step_time = _ema(self.step_time, dt)
        if not prefill:
            self.decode_step_time = _ema(self.decode_step_time, dt)
        if decode:
            self.decode_rate = _ema(self.decode_rate, decode / dt)
        if prefill:
            if prefill >= PREFILL_SAMPLE_MIN_TOKENS and prefill >= decode:
                self._prefill_steps.append((prefill, dt))
            elif not self._prefill_steps:
                self._any_prefill_rate = _ema(self._any_prefill_rate, prefill / dt)

    @property
    def prefill_rate(self) -> float | None:
        """Prompt tokens per second of engine time, from the recent steps that mostly computed prompt (a lower
        bound of the marginal rate: those steps also pay the fixed cost and their few decodes); before the first
        such step, from every step with prompt work."""
        steps = self._prefill_steps
        if not steps:
            return self._any_prefill_rate
        return sum(p for p, _ in steps) / sum(t for _, t in steps)

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
    tokens), ``running`` (requests scheduled). Lines are buffered and written every 256 steps and at exit.
    """

    def __init__(self, path: str) -> None:
        import atexit

        # Open for the engine process's whole life (no block to scope it to): closed, hence flushed, at exit.
        self._f = open(path, "a", buffering=1 << 16)  # noqa: SIM115
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
