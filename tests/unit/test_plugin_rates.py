"""The vLLM plugin's step rates (backends/vllm/tokenflow_vllm/rates.py): the state report's ``step_time_s``
averages every step, ``decode_step_time_s`` only steps that computed no prompt, so that a burst's long prefill
steps do not read as lost decode capacity, and ``prefill_tokens_per_s`` only steps that mostly computed prompt.
Pure Python on a fake clock, loaded by path (the plugin's package is installed in vLLM's environment, not this
one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rates() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tf_rates", ROOT / "backends/vllm/tokenflow_vllm/rates.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def step(n_decode: int, prefill_chunk: int = 0) -> SimpleNamespace:
    """A scheduler output: ``n_decode`` requests with one token each, one with a prompt chunk if given."""
    tokens = {f"d{i}": 1 for i in range(n_decode)}
    if prefill_chunk:
        tokens["p"] = prefill_chunk
    return SimpleNamespace(num_scheduled_tokens=tokens, scheduled_spec_decode_tokens={})


class Steps:
    """The plugin's StepRates on a fake clock: ``run(out, seconds)`` schedules a step and outputs it that much later."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rates = _rates()
        self.clock = Clock()
        monkeypatch.setattr(self.rates.time, "perf_counter", self.clock)
        self.r = self.rates.StepRates()

    def run(self, out: SimpleNamespace, seconds: float) -> None:
        self.r.on_schedule(out)
        self.clock.t += seconds
        self.r.on_output(out)

    def report(self) -> dict[str, float | None]:
        return self.r.report()


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Steps:
    return Steps(monkeypatch)


def test_decode_step_time_leaves_out_prefill_steps(steps: Steps) -> None:
    run, r = steps.run, steps
    assert r.report()["decode_step_time_s"] is None
    for _ in range(20):
        run(step(8), 0.02)
    before = r.report()
    assert before["decode_step_time_s"] == pytest.approx(0.02)
    for _ in range(20):  # a burst: every step computes a prompt chunk beside the decodes, ten times longer
        run(step(8, prefill_chunk=2048), 0.2)
    during = r.report()
    assert during["decode_step_time_s"] == pytest.approx(0.02)  # unchanged: no decode-only step ran
    assert during["step_time_s"] > 0.15  # the all-steps average follows the burst
    for _ in range(3):  # decode-only steps that really are slower move it
        run(step(8), 0.04)
    assert 0.02 < r.report()["decode_step_time_s"] < 0.04


def test_the_prefill_rate_is_timed_on_steps_that_mostly_compute_prompt(steps: Steps) -> None:
    # A preempted stream's short tail recomputed beside hundreds of decodes costs the step little: timing that whole
    # step as prefill read a tenth of the engine's prefill rate on the H200 burst, and the policy priced every
    # switch ten times too high.
    run, r = steps.run, steps
    assert r.report()["prefill_tokens_per_s"] is None
    for _ in range(5):  # only small recomputations so far: the whole steps are all there is to go by
        run(step(250, prefill_chunk=16), 0.016)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(16 / 0.016)
    for _ in range(4):  # steps that mostly compute prompt: their rate, nothing else from now on
        run(step(8, prefill_chunk=2048), 0.05)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(2048 / 0.05)
    for _ in range(200):  # decode-dominated steps with a recomputed tail leave it alone
        run(step(250, prefill_chunk=16), 0.016)
        run(step(250), 0.015)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(2048 / 0.05)
    for _ in range(steps.rates.PREFILL_SAMPLES):  # the last few such steps make the rate: it follows a slower engine
        run(step(4, prefill_chunk=1024), 0.05)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1024 / 0.05)
    run(step(300, prefill_chunk=299), 0.05)  # fewer prompt tokens than decodes: not a sample
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1024 / 0.05)
