"""Hardware profiles: loading, validation, the step-time formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backends.sim.profile import PROFILES_ENV, ProfileError, load_profile, profiles_dir

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
    # t = base + per_token * scheduled + per_kv * attended
    assert p.decode_step_time(4, 1000) == pytest.approx(p.base_s + 4 * p.per_token_s + 1000 * p.per_kv_token_s)
    assert p.prefill_time(512) == pytest.approx(p.base_s + 512 * p.per_token_s)
    n = 2 * p.max_num_batched_tokens + 1
    assert p.chunked_prefill_time(n) == pytest.approx(3 * p.base_s + n * p.per_token_s)
    assert p.load_time(1000) == pytest.approx(1000 * p.kv_bytes_per_token / p.h2d_bytes_per_s)
    assert p.store_time(1000) == pytest.approx(1000 * p.kv_bytes_per_token / p.d2h_bytes_per_s)
