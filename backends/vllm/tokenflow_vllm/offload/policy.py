"""``PinnedLRU``: vLLM's LRU host-cache policy that never evicts chunks of held requests.

Load with ``"eviction_policy": "PinnedLRU", "cache_policy_module_path": "tokenflow_vllm.offload.policy"``
in ``kv_connector_extra_config`` (vLLM 0.32+; on 0.26 the spec module registers it). When every evictable
chunk is pinned, a store simply is not made (the manager treats a failed eviction as "no room"), exactly as
when the host tier is full.

A pinned chunk is taken out of the LRU's eviction order while pinned (through the policy's own
``mark_non_evictable`` / ``mark_evictable``, so vLLM's LRU internals stay vLLM's) and put back, as most
recently used, when unpinned. Skipping pinned chunks at eviction time instead costs a scan past all of them
on every store once the tier is full: 4 ms per eviction with 13,000 pinned chunks, which on an H200 made
decode steps twice as long while the gateway held ~100 requests.

It also reports the chunks leaving the tier (``pins.note_removed``), so the scheduler's per-request host-copy
accounting stays incremental (tokenflow_vllm/host_prefix.py).
"""
from __future__ import annotations

from collections.abc import Hashable

from vllm.v1.kv_offload.cpu.policies.lru import LRUCachePolicy

from tokenflow_vllm.offload import pins


class PinnedLRU(LRUCachePolicy):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hidden: set[Hashable] = set()  # pinned chunks that would otherwise be evictable
        pins.attach(self)

    def _evictable_now(self, key: Hashable) -> bool:
        chunk = self.get(key)
        return chunk is not None and chunk.ref_cnt == 0 and key not in self._hidden

    # -- pins -------------------------------------------------------------------------------------

    def on_pinned(self, key: Hashable) -> None:
        if self._evictable_now(key):
            super().mark_non_evictable(key)
            self._hidden.add(key)

    def on_unpinned(self, key: Hashable) -> None:
        if key in self._hidden:
            self._hidden.discard(key)
            if self.get(key) is not None:
                super().mark_evictable(key)

    # -- the policy -------------------------------------------------------------------------------

    def insert(self, key, chunk) -> None:
        super().insert(key, chunk)
        if pins.is_pinned(key):
            self.on_pinned(key)

    def mark_evictable(self, key) -> None:
        if pins.is_pinned(key):
            self._hidden.add(key)
        else:
            super().mark_evictable(key)

    def mark_non_evictable(self, key) -> None:
        if key in self._hidden:
            self._hidden.discard(key)  # not in the LRU's evictable order: nothing else to undo
        else:
            super().mark_non_evictable(key)

    def evict(self, n, protected):
        out = super().evict(n, protected)
        if out:
            pins.note_removed(key for key, _ in out)
        return out

    def remove(self, key) -> None:
        self._hidden.discard(key)
        super().remove(key)
        pins.note_removed((key,))

    def clear(self) -> None:
        self._hidden.clear()
        super().clear()
        pins.note_cleared()
