"""Which leading chunks of each tracked request are on the host tier, kept incrementally.

The state report gives every live request's host copy (``kv_host_tokens``): the chunks of its KV, from the
first on, that the host tier holds. Checking every chunk of every request at each report costs a few
microseconds per chunk: with 400 requests of 2,500 tokens in 16-token chunks, 60,000 lookups, 40-90 ms on the
scheduler's thread, at every report (seen on an H200: decode steps of 40-100 ms instead of 12 ms twice per
gateway tick while the host tier was full and evicting, which forced a full re-check each time). Here a
request's verified prefix only grows by the chunks stored since the last look, and a chunk that leaves the
tier cuts the prefixes that contain it at that chunk; nothing else is looked at again.

Pure bookkeeping, no vLLM: owners and keys are any hashable values; ``present`` says whether the host tier
holds a chunk now.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable


class HostPrefixes:
    def __init__(self) -> None:
        self._prefix: dict[Hashable, list[Hashable]] = {}  # owner -> its verified leading keys, in order
        self._owners: dict[Hashable, set[Hashable]] = {}  # key -> owners whose verified prefix holds it

    def length(self, owner: Hashable) -> int:
        """Chunks verified for ``owner``, from its first."""
        p = self._prefix.get(owner)
        return len(p) if p else 0

    def distinct(self) -> int:
        """Distinct chunks the verified prefixes hold (shared prompt prefixes count once)."""
        return len(self._owners)

    def extend(self, owner: Hashable, next_keys: Iterable[Hashable], present: Callable[[Hashable], bool]) -> None:
        """Extend ``owner``'s prefix with ``next_keys`` (its keys from chunk ``length(owner)`` on, lazily) while
        the host tier holds them."""
        p = self._prefix.setdefault(owner, [])
        owners = self._owners
        for key in next_keys:
            if not present(key):
                break
            p.append(key)
            s = owners.get(key)
            if s is None:
                owners[key] = {owner}
            else:
                s.add(owner)

    def drop(self, owner: Hashable) -> None:
        """Forget ``owner`` (finished, or its KV is no longer its own)."""
        p = self._prefix.pop(owner, None)
        if p:
            self._release(owner, p)

    def removed(self, keys: Iterable[Hashable]) -> None:
        """Chunks that left the host tier: each prefix holding one is cut before it."""
        for key in keys:
            holders = self._owners.get(key)
            if not holders:
                continue
            for owner in list(holders):
                p = self._prefix[owner]
                i = p.index(key)
                self._release(owner, p[i:])
                del p[i:]

    def clear(self) -> None:
        """Forget every prefix (the tier was cleared, or its removals were not all seen)."""
        self._prefix.clear()
        self._owners.clear()

    def _release(self, owner: Hashable, keys: list[Hashable]) -> None:
        owners = self._owners
        for key in keys:
            s = owners.get(key)
            if s is not None:
                s.discard(owner)
                if not s:
                    del owners[key]
