"""The vLLM plugin's host-copy accounting (backends/vllm/tokenflow_vllm/host_prefix.py and offload/pins.py): a
request's ``kv_host_tokens`` must be exactly the chunks from its first on that the host tier holds, kept up to
date from the chunks stored and removed since the last report, without re-checking the rest. Pure Python, loaded
by path (the plugin's package is installed in vLLM's environment, not this one)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, rel: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hp = _load("tokenflow_vllm_host_prefix", "backends/vllm/tokenflow_vllm/host_prefix.py")


def _true_prefix(keys: list[str], tier: set[str]) -> int:
    n = 0
    for k in keys:
        if k not in tier:
            break
        n += 1
    return n


def test_prefixes_follow_stores_and_removals_exactly_while_checking_only_new_chunks() -> None:
    """Random stores, removals and finishes over requests sharing prompt prefixes: after every report each
    request's verified length equals a full re-check, and a report looks only at chunks past each prefix."""
    rng = random.Random(7)
    prompts = [[f"p{p}c{i}" for i in range(6)] for p in range(3)]
    reqs = {f"r{j}": prompts[j % 3] + [f"r{j}c{i}" for i in range(rng.randrange(4, 20))] for j in range(12)}
    tier: set[str] = set()
    looked: list[str] = []

    def present(key: str) -> bool:
        looked.append(key)
        return key in tier

    pre = hp.HostPrefixes()
    live = dict(reqs)
    for _ in range(300):
        removed: list[str] = []
        for _ in range(rng.randrange(0, 30)):  # the write-through stores chunks in order, per request
            keys = rng.choice(list(reqs.values()))
            n = _true_prefix(keys, tier)
            if n < len(keys):
                tier.add(keys[n])
        for k in rng.sample(sorted(tier), k=min(len(tier), rng.randrange(0, 6))):  # evictions
            tier.discard(k)
            removed.append(k)
        if len(live) > 1 and rng.random() < 0.05:  # a request finishes
            gone = rng.choice(sorted(live))
            del live[gone]
            pre.drop(gone)
        pre.removed(removed)
        looked.clear()
        for rid, keys in live.items():
            pre.extend(rid, iter(keys[pre.length(rid):]), present)
            assert pre.length(rid) == _true_prefix(keys, tier), rid
        # at most one chunk past each prefix is looked at (the one that stops it), never those before
        assert len(looked) <= sum(pre.length(r) for r in live) + len(live)
        held = {k for rid, keys in live.items() for k in keys[: pre.length(rid)]}
        assert pre.distinct() == len(held)  # shared prompt chunks count once


def test_a_removed_chunk_cuts_every_prefix_holding_it_and_clear_forgets_all() -> None:
    pre = hp.HostPrefixes()
    tier = {"a", "b", "c", "d"}
    pre.extend("x", iter(["a", "b", "c"]), tier.__contains__)
    pre.extend("y", iter(["a", "b", "d"]), tier.__contains__)
    assert (pre.length("x"), pre.length("y"), pre.distinct()) == (3, 3, 4)
    pre.removed(["b", "zzz"])
    assert (pre.length("x"), pre.length("y"), pre.distinct()) == (1, 1, 1)
    pre.drop("never seen")  # nothing to forget
    pre.clear()
    assert (pre.length("x"), pre.distinct()) == (0, 0)


def test_the_removal_log_is_taken_once_and_falls_back_to_a_full_recheck() -> None:
    pins = _load("tokenflow_vllm_pins", "backends/vllm/tokenflow_vllm/offload/pins.py")
    assert pins.take_removed() == []
    pins.note_removed(iter(["a", "b"]))
    pins.note_removed(("c",))
    assert pins.take_removed() == ["a", "b", "c"]
    assert pins.take_removed() == []
    pins.note_removed(("a",))
    pins.note_cleared()  # the tier was dropped: every check is stale
    assert pins.take_removed() is None
    assert pins.take_removed() == []
    setattr(pins, "_REMOVED_MAX", 3)  # noqa: B010 (a module loaded by path: mypy cannot see its names)
    pins.note_removed(["a", "b", "c", "d"])  # more than kept: nobody took them for a long time
    assert pins.take_removed() is None
