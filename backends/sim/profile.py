"""Hardware profiles of the simulated engine: load, validate, and predict step times.

A profile is a small YAML file (``configs/profiles/<name>.yaml``) describing one model on one accelerator
with a two-regime cost model (docs/sim-cost-model.md)::

    t_step = max(base_s + per_token_s * scheduled_tokens, compute_per_token_s * scheduled_tokens)
             + per_kv_token_s * attended_kv_tokens

``scheduled_tokens`` counts every token computed in the step (one per decoding request plus every token of
each prefill chunk); ``attended_kv_tokens`` is the sum of the context lengths of the decoding requests.
``compute_per_token_s`` is optional and defaults to 0, which leaves the linear form
``base_s + per_token_s * scheduled_tokens + per_kv_token_s * attended_kv_tokens`` exactly.

:func:`step_seconds` is the one implementation of the formula: the engine core, the profile's helpers and the
GPU calibration (``calibrate.py``) all price steps through it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROFILES_ENV = "TOKENFLOW_PROFILES_DIR"


class ProfileError(ValueError):
    """A profile file is missing, unreadable or invalid."""


def step_seconds(base_s: float, per_token_s: float, compute_per_token_s: float, per_kv_token_s: float,
                 scheduled_tokens: float, attended_kv_tokens: float) -> float:
    """Duration of one engine step (keep in sync with docs/sim-cost-model.md and the GPU calibration).

    The larger of a memory-bound line (the weights read once per step, plus a small per-token cost) and a
    compute-bound line (every token's matmul FLOPs at the achieved rate), plus the decode attention's KV reads.
    With ``compute_per_token_s == 0`` the result is exactly the linear form.
    """
    memory = base_s + per_token_s * scheduled_tokens
    compute = compute_per_token_s * scheduled_tokens
    return (memory if memory >= compute else compute) + per_kv_token_s * attended_kv_tokens


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    source: str
    model_name: str
    kv_bytes_per_token: int
    max_model_len: int
    base_s: float
    per_token_s: float
    per_kv_token_s: float
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    device_tokens: int
    host_tokens: int
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    compute_per_token_s: float = 0.0  # optional compute-bound regime; 0 keeps the linear form
    # The host tier copies a request's KV in whole chunks of this many tokens (vLLM's offloading connector: whole
    # KV blocks): its unfilled last chunk has no host copy, and resume recomputes it. 1: token by token.
    host_copy_tokens: int = 1
    # How the engine's own preemption behaves (section ``engine:``, all optional; the defaults keep the
    # plain model, docs/sim-cost-model.md "Engine preemption modes"):
    preempt_cascade: bool = False  # freed blocks usable only after the step: a failed allocation preempts
    #   every running request behind the one that failed (in victim order), itself included (vLLM 0.26, async)
    prefix_cache: bool = False  # a preempted request's freed blocks keep its KV until reused (LRU)
    loaded_first: bool = True  # requests holding reloaded KV are admitted first (vLLM's kv-holding queue);
    #   false: one queue by priority, then arrival, as vLLM 0.26
    preempt_s: float = 0.0  # engine time per preempted request (scheduler work, tail store), added to the step
    state_s_per_held: float = 0.0  # engine time a control round (state read, then its commands) costs per held
    #   or parked request: both run on the scheduler thread between steps (vLLM plugin), added to the next step
    control_lag_steps: int = 0  # engine steps between a control state read and the first step that sees the
    #   commands decided on it (vLLM: the command call waits for a step boundary, async scheduling adds one)
    prefill_rate_measure: str = "marginal"  # the state's prefill_tokens_per_s: "marginal", prefill's share of the
    #   steps' compute (docs/sim-cost-model.md); "whole_steps", prompt tokens over the whole time of every step with
    #   prompt work, as the vLLM plugin reported it until 2026-12-04 (a tenth of the real rate under rotation);
    #   "prompt_steps", the whole time of the steps that mostly computed prompt, as the plugin reported it on
    #   2026-12-04 (the ninth GPU sitting: about 0.6x the marginal rate under rotation); "fitted", the plugin's
    #   measure now (its own code, backends/sim/plugin_rates.py): the time a prompt token adds to a step, fitted
    #   over the recent steps with at least 256 of them.

    # --- the cost model: every step price goes through step_seconds ---

    def step_time(self, scheduled_tokens: int, attended_kv_tokens: int) -> float:
        """Duration of one engine step (without any preemption flush stall, which the core adds)."""
        return step_seconds(self.base_s, self.per_token_s, self.compute_per_token_s, self.per_kv_token_s,
                            scheduled_tokens, attended_kv_tokens)

    def decode_step_time(self, batch: int, total_context: int) -> float:
        """A pure decode step: ``batch`` requests, each computing one token, with ``total_context`` tokens
        of context summed over them (each request's context includes the token being computed)."""
        return self.step_time(batch, total_context)

    def prefill_time(self, tokens: int) -> float:
        """A step that computes ``tokens`` prompt tokens of one request and nothing else.

        Prefill chunks pay no attention term in this model. A prompt longer than
        ``max_num_batched_tokens`` is split into several steps by the engine; this function prices one
        step of ``tokens`` tokens, so callers wanting the chunked total use :meth:`chunked_prefill_time`.
        """
        return self.step_time(tokens, 0)

    def chunked_prefill_time(self, tokens: int) -> float:
        """Total time to prefill ``tokens`` tokens alone, in chunks of ``max_num_batched_tokens``."""
        if tokens <= 0:
            return 0.0
        full, rest = divmod(tokens, self.max_num_batched_tokens)
        total = full * self.prefill_time(self.max_num_batched_tokens) if full else 0.0
        return total + self.prefill_time(rest) if rest else total

    def load_time(self, tokens: int) -> float:
        """Seconds to copy ``tokens`` tokens of KV host -> device."""
        return tokens * self.kv_bytes_per_token / self.h2d_bytes_per_s

    def store_time(self, tokens: int) -> float:
        """Seconds to copy ``tokens`` tokens of KV device -> host."""
        return tokens * self.kv_bytes_per_token / self.d2h_bytes_per_s

    @property
    def device_blocks(self) -> int:
        return self.device_tokens // self.block_size


# (yaml section, key, field, type, must be > 0); fields with a default in Profile are optional
_FIELDS: tuple[tuple[str, str, str, type, bool], ...] = (
    ("model", "kv_bytes_per_token", "kv_bytes_per_token", int, True),
    ("model", "max_model_len", "max_model_len", int, True),
    ("step", "base_s", "base_s", float, False),
    ("step", "per_token_s", "per_token_s", float, False),
    ("step", "per_kv_token_s", "per_kv_token_s", float, False),
    ("step", "compute_per_token_s", "compute_per_token_s", float, False),
    ("batch", "max_num_seqs", "max_num_seqs", int, True),
    ("batch", "max_num_batched_tokens", "max_num_batched_tokens", int, True),
    ("batch", "block_size", "block_size", int, True),
    ("kv", "device_tokens", "device_tokens", int, True),
    ("kv", "host_tokens", "host_tokens", int, False),
    ("kv", "host_copy_tokens", "host_copy_tokens", int, True),
    ("transfer", "h2d_bytes_per_s", "h2d_bytes_per_s", float, True),
    ("transfer", "d2h_bytes_per_s", "d2h_bytes_per_s", float, True),
    ("engine", "preempt_s", "preempt_s", float, False),
    ("engine", "state_s_per_held", "state_s_per_held", float, False),
    ("engine", "control_lag_steps", "control_lag_steps", int, False),
)

_OPTIONAL = frozenset({"compute_per_token_s", "host_copy_tokens", "preempt_s", "state_s_per_held",
                       "control_lag_steps"})
_OPTIONAL_SECTIONS = frozenset({"engine"})
_FLAGS = (("engine", "preempt_cascade", "preempt_cascade"), ("engine", "prefix_cache", "prefix_cache"),
          ("engine", "loaded_first", "loaded_first"))
PREFILL_RATE_MEASURES = ("marginal", "fitted", "whole_steps", "prompt_steps")


def profile_from_dict(data: Any, origin: str = "<dict>") -> Profile:
    """Validate a parsed profile document and build a :class:`Profile`."""
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: a profile must be a YAML mapping")
    values: dict[str, Any] = {}
    for section, key, fieldname, typ, positive in _FIELDS:
        sec = data.get(section)
        if sec is None and section in _OPTIONAL_SECTIONS:
            continue
        if not isinstance(sec, dict):
            raise ProfileError(f"{origin}: missing section '{section}'")
        if key not in sec:
            if fieldname in _OPTIONAL:
                continue
            raise ProfileError(f"{origin}: missing field '{section}.{key}'")
        raw = sec[key]
        if isinstance(raw, str):
            # YAML 1.1 (PyYAML) reads exponents without a sign, like 5.0e10, as strings
            try:
                raw = float(raw)
            except ValueError:
                pass
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ProfileError(f"{origin}: '{section}.{key}' must be a number, got {raw!r}")
        if typ is int:
            if float(raw) != int(raw):
                raise ProfileError(f"{origin}: '{section}.{key}' must be an integer, got {raw!r}")
            val: int | float = int(raw)
        else:
            val = float(raw)
        if not math.isfinite(val) or val < 0 or (positive and val <= 0):
            raise ProfileError(f"{origin}: '{section}.{key}' must be {'> 0' if positive else '>= 0'}")
        values[fieldname] = val
    for section, key, fieldname in _FLAGS:
        sec = data.get(section) or {}
        if key in sec:
            if not isinstance(sec[key], bool):
                raise ProfileError(f"{origin}: '{section}.{key}' must be true or false, got {sec[key]!r}")
            values[fieldname] = sec[key]
    measure = (data.get("engine") or {}).get("prefill_rate_measure")
    if measure is not None:
        if measure not in PREFILL_RATE_MEASURES:
            raise ProfileError(f"{origin}: 'engine.prefill_rate_measure' must be one of {PREFILL_RATE_MEASURES}, "
                               f"got {measure!r}")
        values["prefill_rate_measure"] = measure
    if values["device_tokens"] < values["block_size"]:
        raise ProfileError(f"{origin}: 'kv.device_tokens' must hold at least one block")
    if values["base_s"] + values["per_token_s"] <= 0 and values.get("compute_per_token_s", 0.0) <= 0:
        raise ProfileError(f"{origin}: a step must take some time (base_s + per_token_s > 0 or "
                           "compute_per_token_s > 0)")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{origin}: missing 'name'")
    model_name = data["model"].get("name", name)
    return Profile(
        name=name,
        description=str(data.get("description", "")),
        source=str(data.get("source", "")),
        model_name=str(model_name),
        **values,
    )


def profiles_dir() -> Path:
    """Where bare profile names are looked up: $TOKENFLOW_PROFILES_DIR, else the repo's configs/profiles."""
    env = os.environ.get(PROFILES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs" / "profiles"


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load a profile by bare name (``sim-small``) or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text)
    looks_like_path = os.sep in text or "/" in text or text.endswith((".yaml", ".yml"))
    if not looks_like_path:
        path = profiles_dir() / f"{text}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in profiles_dir().glob("*.yaml")) if profiles_dir().is_dir() else []
            raise ProfileError(f"unknown profile '{text}' (looked in {profiles_dir()}; known: {known})")
    try:
        raw = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: invalid YAML: {exc}") from exc
    return profile_from_dict(data, str(path))
