"""Host chunks that must not be evicted: the write-through copies of requests the gateway holds.

The scheduler (which knows which requests are held) and the offloading manager's cache policy (which
evicts) live in the same EngineCore process, so a process-wide registry is enough. Keys are reference
counted because requests that share a prompt prefix share host chunks. The cache policy attaches itself
(:func:`attach`) and is told when a key becomes pinned or unpinned, so it can keep pinned chunks out of its
eviction order instead of skipping them on every eviction.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import Protocol


class PinAware(Protocol):
    def on_pinned(self, key: Hashable) -> None: ...

    def on_unpinned(self, key: Hashable) -> None: ...


_pins: Counter = Counter()
_removals = 0  # chunks that left the host tier through PinnedLRU (evicted or dropped), ever
_policies: list[PinAware] = []


def attach(policy: PinAware) -> None:
    """Tell ``policy`` about pins from now on (and about the keys pinned already)."""
    _policies.append(policy)
    for key in _pins:
        policy.on_pinned(key)


def pin(keys: Iterable[Hashable]) -> None:
    for k in keys:
        _pins[k] += 1
        if _pins[k] == 1:
            for p in _policies:
                p.on_pinned(k)


def unpin(keys: Iterable[Hashable]) -> None:
    for k in keys:
        n = _pins.get(k, 0)
        if n <= 1:
            if _pins.pop(k, None) is not None:
                for p in _policies:
                    p.on_unpinned(k)
        else:
            _pins[k] = n - 1


def is_pinned(key: Hashable) -> bool:
    return key in _pins


def pinned_keys() -> set:
    return set(_pins)


def count() -> int:
    return len(_pins)


def note_removed(n: int) -> None:
    """Called by PinnedLRU when chunks leave the host tier: cached presence checks are then stale."""
    global _removals
    _removals += n


def removals() -> int:
    return _removals
