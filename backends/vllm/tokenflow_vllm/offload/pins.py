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
_policies: list[PinAware] = []
# Chunks that left the host tier through PinnedLRU (evicted or dropped) since the scheduler last took them
# (take_removed), so that its host-copy accounting stays incremental. Bounded: past _REMOVED_MAX keys (nobody
# asked for a long time) or on a clear, only "everything may have gone" is kept.
_REMOVED_MAX = 1 << 20
_removed: list[Hashable] = []
_removed_all = False


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


def note_removed(keys: Iterable[Hashable]) -> None:
    """Called by PinnedLRU when chunks leave the host tier: presence checks of these keys are then stale."""
    global _removed_all
    if not _removed_all:
        _removed.extend(keys)
        if len(_removed) > _REMOVED_MAX:
            note_cleared()


def note_cleared() -> None:
    """Called by PinnedLRU when the whole tier is dropped: every presence check is stale."""
    global _removed_all
    _removed_all = True
    _removed.clear()


def take_removed() -> list[Hashable] | None:
    """The keys removed since the last call, or None if every presence check is stale (cleared, or too many
    removals to keep); then starts afresh."""
    global _removed_all
    if _removed_all:
        _removed_all = False
        return None
    out = _removed[:]
    _removed.clear()
    return out
