"""The H100 profile against the GPU measurements it was fitted to (docs/calibration.md).

The measured steps come from the raw calibration record (configs/profiles/measurements/h100-llama3-8b.json),
not from the profile, so editing the profile's coefficients without re-measuring makes these tests fail.
Predictions go through the simulated engine's own loader and cost model (backends/sim/profile.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from backends.sim import calibrate
from backends.sim.profile import Profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "configs" / "profiles" / "h100-llama3-8b.yaml"
RAW = ROOT / "configs" / "profiles" / "measurements" / "h100-llama3-8b.json"
OFFLOAD = ROOT / "configs" / "profiles" / "measurements" / "h100-cuda-offload-check.json"
DATA = "t_graph_s"  # CUDA-graph forward with fused pointwise kernels: what the profile models

# The linear model of backends/sim/profile.py cannot price decode tokens (~11 us each on top of the weight read)
# and prefill tokens (~29 us each) within 10% with one coefficient; over the benchmark's operating range its
# least-squares fit is off by at most 19.1% (rms 8.2%). These bounds guard that fit; the 10% check applies to
# the two-regime form the calibration proposes (measurements.proposed_step).
LINEAR_MAX_ERR = 0.20
LINEAR_RMS_ERR = 0.10
PROPOSED_MAX_ERR = 0.10


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return json.loads(RAW.read_text())


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(PROFILE.read_text())


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(PROFILE)


def points(raw: dict[str, Any], operating_range_only: bool) -> list[dict[str, Any]]:
    rng = calibrate.OPERATING_RANGE if operating_range_only else None
    return calibrate.select_points(raw, DATA, rng)


def linear_prediction(profile: Profile, p: dict[str, Any]) -> float:
    """The simulated engine's price for a measured step, through the entry point that matches its kind."""
    if p["kind"] == "decode":
        return profile.decode_step_time(p["scheduled_tokens"], p["attended_kv_tokens"])
    if p["kind"] == "prefill" and len(p["segments"]) == 1 and p["segments"][0][1] == 1:
        return profile.prefill_time(p["scheduled_tokens"])
    return profile.step_time(p["scheduled_tokens"], p["attended_kv_tokens"])


def rel_errors(predict: Callable[[dict[str, Any]], float], pts: list[dict[str, Any]]) -> list[float]:
    return [predict(p) / p[DATA] - 1.0 for p in pts]


def proposed_predictor(profile: Profile, doc: dict[str, Any]) -> Callable[[dict[str, Any]], float]:
    """The two-regime cost model: the loader's own once it prices it, else the formula on proposed_step."""
    if hasattr(profile, "compute_per_token_s"):
        return lambda p: profile.step_time(p["scheduled_tokens"], p["attended_kv_tokens"])
    step = doc["measurements"]["proposed_step"]
    return lambda p: calibrate.two_regime_predict(step, p["scheduled_tokens"], p["attended_kv_tokens"])


def test_profile_is_the_measured_h100_one(profile: Profile, doc: dict[str, Any], raw: dict[str, Any]) -> None:
    assert profile.name == "h100-llama3-8b" and profile.source == "measured"
    m = doc["measurements"]
    assert "H100" in m["card"] and m["card"] in raw["env"]["nvidia_smi"]
    assert m["driver"] in raw["env"]["nvidia_smi"] and m["torch"] == raw["env"]["torch"]
    assert (ROOT / m["raw"]).resolve() == RAW.resolve() and (ROOT / m["offload_check"]).is_file()
    assert profile.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2
    # Device KV is vLLM's sizing at gpu-memory-utilization 0.9, as measured on the card.
    assert profile.device_tokens == raw["kv_capacity"]["kv_tokens_at_0.9"]
    assert profile.device_tokens % profile.block_size == 0
    # Transfer rates are the 2 MiB-block copies measured while decode steps ran.
    copies = raw["copy"]["with_decode"]
    assert profile.d2h_bytes_per_s == pytest.approx(copies["d2h"]["copy_gb_per_s_with_compute"]["d2h"] * 1e9,
                                                    rel=1e-3)
    assert profile.h2d_bytes_per_s == pytest.approx(copies["h2d"]["copy_gb_per_s_with_compute"]["h2d"] * 1e9,
                                                    rel=1e-3)


def test_measurements_cover_the_benchmark_range(raw: dict[str, Any]) -> None:
    decode = [p for p in raw["decode"] if p[DATA] is not None]
    assert {p["n"] for p in decode} >= {1, 8, 32, 64, 128, 256}
    assert {p["length"] for p in decode} >= {128, 1024, 4096, 8192}
    assert {p["scheduled_tokens"] for p in raw["prefill"]} >= {128, 1024, 8192}
    assert len(raw["mixed"]) >= 5
    assert raw["decode_logits_finite"] and raw["kv_capacity"]["prefill_logits_finite"]
    assert all(p[DATA] > 0 and math.isfinite(p[DATA]) for p in points(raw, False))


def test_linear_profile_predicts_the_operating_range(profile: Profile, raw: dict[str, Any]) -> None:
    pts = points(raw, operating_range_only=True)
    assert len(pts) >= 60
    errs = rel_errors(lambda p: linear_prediction(profile, p), pts)
    worst = max(range(len(pts)), key=lambda i: abs(errs[i]))
    assert abs(errs[worst]) <= LINEAR_MAX_ERR, (pts[worst]["segments"], errs[worst])
    assert math.sqrt(sum(e * e for e in errs) / len(errs)) <= LINEAR_RMS_ERR


def test_linear_profile_prices_single_decode_and_full_prefill_chunk(profile: Profile, raw: dict[str, Any]) -> None:
    """The two steps every benchmark run is made of: one stream decoding, and an 8192-token prefill step."""
    one = next(p for p in raw["decode"] if p["n"] == 1 and p["length"] == 1024)
    chunk = next(p for p in raw["prefill"] if p["n"] == 1 and p["length"] == 8192)
    assert linear_prediction(profile, one) == pytest.approx(one[DATA], rel=0.10)
    assert linear_prediction(profile, chunk) == pytest.approx(chunk[DATA], rel=LINEAR_MAX_ERR)


def test_proposed_cost_model_within_10_percent_everywhere(profile: Profile, doc: dict[str, Any],
                                                          raw: dict[str, Any]) -> None:
    pts = points(raw, operating_range_only=False)
    errs = rel_errors(proposed_predictor(profile, doc), pts)
    worst = max(range(len(pts)), key=lambda i: abs(errs[i]))
    assert abs(errs[worst]) <= PROPOSED_MAX_ERR, (pts[worst]["segments"], errs[worst])


@pytest.mark.parametrize(("coef", "factor"), [("base_s", 1.15), ("base_s", 0.85), ("compute_per_token_s", 1.15),
                                              ("compute_per_token_s", 0.85), ("per_kv_token_s", 1.3),
                                              ("per_token_s", 2.0)])
def test_the_10_percent_check_catches_wrong_coefficients(doc: dict[str, Any], raw: dict[str, Any], coef: str,
                                                         factor: float) -> None:
    step = dict(doc["measurements"]["proposed_step"])
    step[coef] *= factor
    errs = rel_errors(lambda p: calibrate.two_regime_predict(step, p["scheduled_tokens"],
                                                             p["attended_kv_tokens"]), points(raw, False))
    assert max(abs(e) for e in errs) > PROPOSED_MAX_ERR


def test_profile_coefficients_are_the_fit_of_the_raw_measurements(doc: dict[str, Any], raw: dict[str, Any]) -> None:
    fit = calibrate.fit_linear(points(raw, operating_range_only=True), DATA)
    for key in ("base_s", "per_token_s", "per_kv_token_s"):
        assert doc["step"][key] == pytest.approx(fit[key], rel=1e-4), key
    assert doc["measurements"]["fit_max_rel_err"] == pytest.approx(fit["max_rel_err"], abs=1e-4)
    proposed = calibrate.fit_two_regime(points(raw, operating_range_only=False), DATA)
    for key in ("base_s", "per_token_s", "compute_per_token_s", "per_kv_token_s"):
        assert doc["measurements"]["proposed_step"][key] == pytest.approx(proposed[key], rel=1e-3), key


def test_offload_copy_path_was_bit_exact_on_cuda() -> None:
    res = json.loads(OFFLOAD.read_text())
    assert res["ok"] and res["bit_exact"]
    assert {(c["layout"], c["with_compute"]) for c in res["bit_exact"]} == {
        ("block", False), ("block", True), ("layer", False), ("layer", True)}
    assert all(c["ok"] and c["host_bit_exact"] and c["device_bit_exact"] for c in res["bit_exact"])
