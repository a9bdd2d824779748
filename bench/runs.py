"""The runs of one benchmark: each ``--policies`` entry names a policy, optionally with knob overrides of its own,
so that variants of one policy run beside each other on identical arrivals:

    fcfs,tokenflow,tokenflow:first_token_grace_s=1;stall_budget_s=8,tokenflow@measured,fcfs#2

``NAME[@DRAIN][#N][:KNOB=VALUE;...]``: ``@measured`` (virtual mode) gives the policy the gateway's measured drain
instead of the declared rates; ``#N`` names the Nth run of the same entry (one engine serving a policy again, for
the spread between runs); the knobs override ``--knob NAME.KNOB=VALUE`` for that run only. The entry as
written keys the run's results in the report; its :attr:`PolicyRun.label` names the run's files and salts its
prompts. Every entry is checked (policy, knob names, values) before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.policy import make_policy

DRAINS = ("declared", "measured")


@dataclass(frozen=True)
class PolicyRun:
    spec: str  # as written: the run's key in the report
    policy: str  # the registered policy name
    drain: str = "declared"  # virtual mode: the rates the policy sees (declared, or as the gateway measures them)
    knobs: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def label(self) -> str:
        return run_label(self.spec)


def run_label(spec: str) -> str:
    """A run's name in file names: ``tokenflow:first_token_grace_s=1`` -> ``tokenflow-first_token_grace_s1``,
    ``fcfs#2`` -> ``fcfs-2``."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "", spec.strip().replace(":", "-").replace(";", "-").replace("#", "-"))


def parse_run(spec: str, base: Mapping[str, Mapping[str, float]] | None = None) -> PolicyRun:
    """One ``--policies`` entry; ``base``: the ``--knob`` overrides by policy, which the entry's own override.
    ValueError, saying what is wrong, for an unknown policy or knob, a value that is not a number, or a bad form."""
    head, colon, rest = spec.strip().partition(":")
    head, hash_, nth = head.partition("#")
    name, at, drain = head.partition("@")
    items = [k.strip() for k in rest.split(";") if k.strip()]
    if (not name or (at and drain not in DRAINS) or (hash_ and not (nth.isdigit() and int(nth) >= 2))
            or (colon and not items) or any("=" not in k for k in items)):
        raise ValueError(f"--policies: {spec!r} is not POLICY[@{'|'.join(DRAINS)}][#N][:KNOB=VALUE;...] (N >= 2)")
    knobs = dict((base or {}).get(name, {}))
    for item in items:
        k, _, v = item.partition("=")
        try:
            knobs[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"--policies: {spec!r}: {v.strip()!r} is not a number") from None
    try:
        make_policy(name, **knobs)  # an unknown policy or knob fails now, not after an engine has started
    except TypeError:  # a policy without knobs (fcfs) given some
        raise ValueError(f"--policies: {spec!r}: {name} has no knobs") from None
    except ValueError as e:
        raise ValueError(f"--policies: {spec!r}: {e}") from None
    return PolicyRun(spec=spec.strip(), policy=name, drain=drain or "declared", knobs=MappingProxyType(knobs))


def parse_runs(policies: str, base: Mapping[str, Mapping[str, float]] | None = None) -> list[PolicyRun]:
    """A comma-separated ``--policies``, each entry as :func:`parse_run`; two entries may not share a label."""
    runs = [parse_run(s, base) for s in policies.split(",") if s.strip()]
    if not runs:
        raise ValueError("--policies: name at least one policy")
    labels = [r.label for r in runs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"--policies: runs named twice: {', '.join(twice)}")
    return runs
