"""Hardware profiles: loading, validation, the step-time formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backends.sim.core import EngineCore
from backends.sim.profile import PROFILES_ENV, ProfileError, load_profile, profile_from_dict, profiles_dir, step_seconds

REPO = Path(__file__).resolve().parents[2]


def _doc() -> dict:
    return yaml.safe_load((REPO / "configs/profiles/sim-small.yaml").read_text())


def test_shipped_profiles_load() -> None:
    for path in sorted((REPO / "configs/profiles").glob("*.yaml")):
        p = load_profile(path.stem)
        assert p.name == path.stem
        assert p.device_blocks * p.block_size <= p.device_tokens
        assert p.h2d_bytes_per_s > 0 and p.d2h_bytes_per_s > 0


def test_load_by_path_and_by_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc()
    doc["name"] = "mine"
    doc["step"]["base_s"] = 0.5
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump(doc))
    assert load_profile(str(f)).base_s == 0.5
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert profiles_dir() == tmp_path
    assert load_profile("mine").name == "mine"
    with pytest.raises(ProfileError, match="unknown profile 'sim-small'"):
        load_profile("sim-small")


def test_exponent_without_sign_is_a_number() -> None:
    # PyYAML reads 5.0e10 as a string; the loader must accept it as the number it obviously is.
    assert load_profile("h200-llama3-8b").h2d_bytes_per_s == 5.0e10


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("step"), "missing section 'step'"),
        (lambda d: d["batch"].pop("block_size"), "missing field 'batch.block_size'"),
        (lambda d: d["batch"].__setitem__("max_num_seqs", 2.5), "must be an integer"),
        (lambda d: d["kv"].__setitem__("device_tokens", "lots"), "must be a number"),
        (lambda d: d["transfer"].__setitem__("h2d_bytes_per_s", 0), "must be > 0"),
        (lambda d: d["step"].__setitem__("per_token_s", -1.0), "must be >= 0"),
        (lambda d: d["step"].__setitem__("compute_per_token_s", -1e-5), "compute_per_token_s' must be >= 0"),
        (lambda d: d["step"].__setitem__("compute_per_token_s", "fast"), "must be a number"),
        (lambda d: d.__setitem__("step", {"base_s": 0, "per_token_s": 0, "per_kv_token_s": 1e-8}), "some time"),
        (lambda d: d["kv"].__setitem__("device_tokens", 8), "at least one block"),
        (lambda d: d.pop("name"), "missing 'name'"),
    ],
)
def test_bad_profiles_are_rejected_clearly(tmp_path: Path, mutate, message: str) -> None:
    doc = _doc()
    mutate(doc)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=message):
        load_profile(str(f))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(tmp_path / "absent.yaml"))
    f = tmp_path / "broken.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ProfileError, match="invalid YAML"):
        load_profile(str(f))
    f.write_text("- a list\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(str(f))


def test_step_time_formula() -> None:
    p = load_profile("sim-small")
    assert p.compute_per_token_s == 0.0  # absent from the file: the linear form
    # t = base + per_token * scheduled + per_kv * attended
    assert p.decode_step_time(4, 1000) == pytest.approx(p.base_s + 4 * p.per_token_s + 1000 * p.per_kv_token_s)
    assert p.prefill_time(512) == pytest.approx(p.base_s + 512 * p.per_token_s)
    n = 2 * p.max_num_batched_tokens + 1
    assert p.chunked_prefill_time(n) == pytest.approx(3 * p.base_s + n * p.per_token_s)
    assert p.load_time(1000) == pytest.approx(1000 * p.kv_bytes_per_token / p.h2d_bytes_per_s)
    assert p.store_time(1000) == pytest.approx(1000 * p.kv_bytes_per_token / p.d2h_bytes_per_s)


def _two_regime(**step: float):
    doc = _doc()
    doc["step"] = {"base_s": 0.006, "per_token_s": 1e-5, "compute_per_token_s": 3e-5, "per_kv_token_s": 5e-8} | step
    return profile_from_dict(doc)


def test_compute_per_token_zero_is_exactly_the_linear_form() -> None:
    doc = _doc()
    absent = profile_from_dict(doc)
    doc["step"]["compute_per_token_s"] = 0
    zero = profile_from_dict(doc)
    for tokens, kv in [(0, 0), (1, 129), (256, 262400), (8192, 0), (544, 32800)]:
        linear = absent.base_s + absent.per_token_s * tokens + absent.per_kv_token_s * kv
        assert absent.step_time(tokens, kv) == zero.step_time(tokens, kv) == linear  # bit for bit


def test_two_regime_step_time() -> None:
    p = _two_regime()
    # few tokens: the memory-bound line (weights read once, plus a small per-token cost)
    assert p.decode_step_time(64, 65600) == pytest.approx(0.006 + 64 * 1e-5 + 65600 * 5e-8)
    # many tokens: the compute-bound line; the KV term adds in either regime
    assert p.prefill_time(8192) == pytest.approx(8192 * 3e-5)
    assert p.step_time(4096, 1000) == pytest.approx(4096 * 3e-5 + 1000 * 5e-8)
    # the regimes meet at base / (compute - per_token) = 300 tokens, and the price is continuous there
    assert p.step_time(300, 0) == pytest.approx(0.009) == pytest.approx(300 * 3e-5)
    assert p.step_time(299, 0) == pytest.approx(0.006 + 299 * 1e-5)
    assert step_seconds(0.006, 1e-5, 3e-5, 5e-8, 301, 7) == p.step_time(301, 7)


def test_chunked_prefill_prices_each_chunk_as_a_step() -> None:
    p = _two_regime()
    m = p.max_num_batched_tokens
    n = 2 * m + 100
    # two full chunks on the compute line, the 100-token rest on the memory line
    assert p.chunked_prefill_time(n) == pytest.approx(2 * p.prefill_time(m) + p.prefill_time(100))
    assert p.chunked_prefill_time(2 * m) == pytest.approx(2 * p.prefill_time(m))
    assert p.chunked_prefill_time(0) == 0.0


def test_engine_core_steps_use_the_profile_cost_model() -> None:
    p = _two_regime()
    core = EngineCore(p)
    core.add("a", prompt_tokens=1000, max_tokens=3, now=0.0)
    step = core.next_step(0.0)
    assert step is not None and step.duration == p.prefill_time(1000) == pytest.approx(1000 * 3e-5)
    core.complete_step(step, step.duration)
    core.add("b", prompt_tokens=50, max_tokens=3, now=step.duration)
    nxt = core.next_step(step.duration)
    assert nxt is not None and (nxt.scheduled_tokens, nxt.attended_kv_tokens) == (51, 1001)
    assert nxt.duration == p.step_time(51, 1001) == pytest.approx(0.006 + 51 * 1e-5 + 1001 * 5e-8)


def test_control_round_fields_are_optional_and_validated() -> None:
    p = profile_from_dict(_doc())
    assert p.state_s_per_held == 0.0 and p.control_lag_steps == 0  # absent: free, instantaneous rounds
    d = _doc()
    d["engine"] = {"state_s_per_held": 0.0005, "control_lag_steps": 3}
    p = profile_from_dict(d)
    assert p.state_s_per_held == 0.0005 and p.control_lag_steps == 3
    for bad in ({"control_lag_steps": 1.5}, {"control_lag_steps": -1}, {"state_s_per_held": -0.1}):
        d["engine"] = bad
        with pytest.raises(ProfileError):
            profile_from_dict(d)


def test_host_copy_granularity_and_prefill_rate_measure_are_optional_and_validated() -> None:
    p = profile_from_dict(_doc())
    assert p.host_copy_tokens == 1 and p.prefill_rate_measure == "marginal"  # absent: token by token, marginal
    d = _doc()
    d["kv"]["host_copy_tokens"] = 16
    d["engine"] = {"prefill_rate_measure": "whole_steps"}
    p = profile_from_dict(d)
    assert p.host_copy_tokens == 16 and p.prefill_rate_measure == "whole_steps"
    for section, bad in (("kv", {"host_copy_tokens": 0}), ("kv", {"host_copy_tokens": 2.5}),
                         ("engine", {"prefill_rate_measure": "steps"})):
        d = _doc()
        d[section] = {**d.get(section, {}), **bad}
        with pytest.raises(ProfileError, match=next(iter(bad))):
            profile_from_dict(d)
    # the H200 profile fitted to vLLM 0.26 copies whole 16-token blocks, as vLLM's offloading connector does
    assert load_profile("h200-llama3-8b-vllm026").host_copy_tokens == 16
