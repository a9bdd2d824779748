"""``PinnedLRU``: vLLM's LRU host-cache policy that never evicts chunks of held requests.

Load with ``"eviction_policy": "PinnedLRU", "cache_policy_module_path": "tokenflow_vllm.offload.policy"``
in ``kv_connector_extra_config``. When every evictable chunk is pinned, a store simply is not made
(the manager treats a failed eviction as "no room"), exactly as when the host tier is full.

It also counts chunks leaving the tier, so the scheduler can keep its per-request host-copy accounting
incremental (it re-checks everything only after a removal).
"""
from __future__ import annotations

from vllm.v1.kv_offload.cpu.policies.lru import LRUCachePolicy

from tokenflow_vllm.offload import pins


class _Protected:
    """Membership view over the manager's protected set and the pins, without copying either."""

    __slots__ = ("_base",)

    def __init__(self, base) -> None:
        self._base = base

    def __contains__(self, key) -> bool:
        return key in self._base or pins.is_pinned(key)


class PinnedLRU(LRUCachePolicy):
    def evict(self, n, protected):
        out = super().evict(n, _Protected(protected) if pins.count() else protected)
        if out:
            pins.note_removed(len(out))
        return out

    def remove(self, key) -> None:
        super().remove(key)
        pins.note_removed(1)

    def clear(self) -> None:
        super().clear()
        pins.note_removed(1)
