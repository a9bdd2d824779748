"""The vLLM plugin's step rates (backends/vllm/tokenflow_vllm/rates.py): the state report's ``step_time_s``
averages every step, ``decode_step_time_s`` only steps that computed no prompt, so that a burst's long prefill
steps do not read as lost decode capacity, and ``prefill_tokens_per_s`` is the time a prompt token adds to a
step, fitted over the steps with enough of them. Pure Python on a fake clock, loaded by path (the plugin's package
is installed in vLLM's environment, not this one: backends/sim/plugin_rates.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from backends.sim import plugin_rates


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
        self.rates = plugin_rates.module()
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


def cost(decode: int, prompt: int) -> float:
    """A step's time on an engine with a fixed cost, a cost per decoding request and one per prompt token (the
    H200's, by regression over a burst's steps: 8.4 ms, 36 us, 20 us)."""
    return 0.0084 + 36e-6 * decode + 20e-6 * prompt


def test_the_prefill_rate_is_what_a_prompt_token_adds_to_a_step(steps: Steps) -> None:
    # Timing whole steps charges their fixed cost and decodes to the prompt: a step of 512 prompt tokens beside 200
    # decodes reads 20k tok/s where each token costs 20 us (50k). The policy rations recomputation by this rate.
    run, r = steps.run, steps
    assert r.report()["prefill_tokens_per_s"] is None
    for _ in range(5):  # only small recomputations so far: the whole steps are all there is to go by
        run(step(250, prefill_chunk=16), cost(250, 16))
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(16 / cost(250, 16))
    mixed = [(d, p) for d in (40, 120, 200, 250) for p in (256, 512, 1024, 2048)]
    for d, p in mixed[: steps.rates.PREFILL_FIT_MIN_SAMPLES - 1]:  # too few to fit: their whole-step rate
        run(step(d, prefill_chunk=p), cost(d, p))
    whole = sum(p for _, p in mixed[:15]) / sum(cost(d, p) for d, p in mixed[:15])
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(whole)
    run(step(*mixed[15]), cost(*mixed[15]))
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1 / 20e-6)  # the slope, not the whole steps' 29k
    for _ in range(200):  # decode steps and small tails beside them leave it alone
        run(step(250, prefill_chunk=16), cost(250, 16) * 1.5)
        run(step(250), cost(250, 0))
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1 / 20e-6)
    for k in range(steps.rates.PREFILL_SAMPLES):  # the recent steps make it: it follows a slower engine
        d, p = mixed[k % len(mixed)]
        run(step(d, prefill_chunk=p), 0.0084 + 36e-6 * d + 40e-6 * p)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1 / 40e-6)


def test_steps_held_up_by_a_stall_do_not_turn_the_prefill_rate(steps: Steps) -> None:
    # A step that waits on a host copy or a stall takes hundreds of milliseconds whatever its prompt; a few of them
    # among the samples turned a plain least-squares slope (the simulator's H200 burst: 12k tok/s for 50k).
    run, r = steps.run, steps
    mixed = [(d, p) for d in (40, 120, 200, 250) for p in (256, 512, 1024, 2048)]
    for k in range(steps.rates.PREFILL_SAMPLES):
        d, p = mixed[k % len(mixed)]
        stall = 0.3 if k % 13 == 5 else 0.0  # 5 of 64 steps held up
        run(step(d, prefill_chunk=p), cost(d, p) + stall)
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(1 / 20e-6, rel=0.01)


def test_without_a_clear_slope_the_prefill_rate_is_the_whole_steps(steps: Steps) -> None:
    run, r = steps.run, steps
    for _ in range(steps.rates.PREFILL_SAMPLES):  # a burst's first steps: every one a full 8,192-token chunk alone
        run(step(0, prefill_chunk=8192), cost(0, 8192))
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(8192 / cost(0, 8192))
    # Prompt sizes that vary, but step times dominated by noise (a stalled step, a slow one): no slope to trust.
    jitter = [0.0, 0.03, 0.001, 0.05, 0.0, 0.02, 0.04, 0.002]
    for k in range(steps.rates.PREFILL_SAMPLES):
        p = 256 + 32 * (k % 5)
        run(step(100, prefill_chunk=p), cost(100, p) + jitter[k % len(jitter)])
    rate = r.report()["prefill_tokens_per_s"]
    times = [cost(100, 256 + 32 * (k % 5)) + jitter[k % len(jitter)] for k in range(steps.rates.PREFILL_SAMPLES)]
    prompts = [256 + 32 * (k % 5) for k in range(steps.rates.PREFILL_SAMPLES)]
    assert rate == pytest.approx(sum(prompts) / sum(times))


def test_the_prefill_rate_is_never_below_the_whole_steps(steps: Steps) -> None:
    # A fitted slope steeper than the whole steps' time per token (a negative fixed cost: nothing an engine has)
    # would price prompts above what the steps themselves show; the whole-step rate bounds it.
    run, r = steps.run, steps
    sizes = [(d, p) for d in (10, 60) for p in range(300, 2000, 100)][: steps.rates.PREFILL_SAMPLES]
    for d, p in sizes:
        run(step(d, prefill_chunk=p), 40e-6 * p - 0.004)
    whole = sum(p for _, p in sizes) / sum(40e-6 * p - 0.004 for _, p in sizes)
    assert whole > 1 / 40e-6
    assert r.report()["prefill_tokens_per_s"] == pytest.approx(whole)


def test_the_step_trace_is_on_disk_as_each_step_ends(steps: Steps, tmp_path) -> None:
    # A server stopped by a signal ends its engine process without exit handlers: what the trace still held in a
    # buffer was lost (the last 0.6-3 s of every GPU burst's last run). Each step's line must be in the file as soon
    # as the step's output is in, with the file still open.
    path = tmp_path / "steps.jsonl"
    trace = steps.rates.StepTrace(str(path))
    out = step(3, prefill_chunk=300)
    trace.on_schedule(out, {})
    steps.clock.t += 0.02
    trace.on_output(out)
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"t": steps.clock.t, "dt": pytest.approx(0.02), "decode": 3, "decode_kv": 0,
                                    "prefill": 300, "running": 4}
