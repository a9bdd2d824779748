"""Host chunks that must not be evicted: the write-through copies of requests the gateway holds.

The scheduler (which knows which requests are held) and the offloading manager's cache policy (which
evicts) live in the same EngineCore process, so a process-wide registry is enough. Keys are reference
counted because requests that share a prompt prefix share host chunks.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Hashable

_pins: Counter = Counter()
_removals = 0  # chunks that left the host tier through PinnedLRU (evicted or dropped), ever


def pin(keys: Iterable[Hashable]) -> None:
    _pins.update(keys)


def unpin(keys: Iterable[Hashable]) -> None:
    for k in keys:
        n = _pins.get(k, 0)
        if n <= 1:
            _pins.pop(k, None)
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
