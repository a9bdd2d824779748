"""A cheaper write-through for vLLM's offloading connector: per step, only the requests with work reach it.

Every step, the connector's scheduler side walks every scheduled request twice: ``_update_req_states`` (new
device blocks, and the offload key of every newly full block) and ``_build_store_jobs`` (full chunks not yet
stored), a dozen calls and slices per request. While decoding, a request fills a block once every
``block_size`` steps, so nearly all of that walk finds nothing; at 256 decoding streams it was most of the
plugin's added time per step, and each store job it does find costs more again (a host allocation, an LRU touch
of every chunk of the request, a transfer on the worker). docs/vllm-backend.md, "Scheduler cost per step".

:func:`install` wraps both:

- ``_update_req_states`` sees the new requests, the resumed ones and those that got device blocks this step, not
  the others, for which it would only have brought their offload keys up to date (appending nothing, or the key
  of a block filled since: that is done below, before the request's chunks are stored, and vLLM's own lookup and
  finish paths bring the keys up to date themselves).
- ``_build_store_jobs`` sees a request once it has ``every`` full chunks not yet stored (``(computed + scheduled)
  // tokens_per_chunk - next_stored >= every`` in some KV group), and every finished request. With ``every`` 1
  this is exact: a skipped request is one for which the connector would have stored nothing and moved nothing
  (it can store less than that bound: offload caps, prompt-only offload, the eagle group's last chunk; never
  more). With ``every`` N a decoding request's chunks go to the host N at a time, in one job instead of N: its
  host copy lags the device by less than N chunks while it runs. When it is preempted, the next step stores the
  rest of its full chunks before the forward that may reuse its blocks (:meth:`WriteThrough.preempted`); when it
  finishes, the connector stores them as always.

Relies on the connector's private state (``_req_status``, each request's ``group_states[i].next_stored_chunk_idx``
and ``update_offload_keys()``, ``config.kv_group_configs[i].tokens_per_chunk``, ``_sliding_window_groups``) and
on ``_update_req_states`` / ``_build_store_jobs`` reading only the scheduler output's fields that the views below
carry, as vLLM 0.26 and 0.32 do; :func:`install` checks for them and leaves the connector alone if they are not
there (and hands a call back to the connector's own code if a request's state has another shape).
"""
from __future__ import annotations

import logging
from typing import Any

from vllm.v1.request import RequestStatus

log = logging.getLogger("tokenflow_vllm.offload")
_ABORTED = RequestStatus.FINISHED_ABORTED

# The plugin's default: every chunk as it fills, as vLLM's connector does (the pace of the burst runs that met the
# targets on the H200). 4 (chunks of 16 tokens, vLLM's CUDA block size) makes one job per decoding request every 64
# steps instead of every 16: decode steps 14 % shorter in a burst on the H200, where each store job costs the
# engine's thread a pointer computation per KV tensor; not the default until a paired burst has weighed it.
# docs/gpu-sittings.md, "Seventh sitting".
STORE_EVERY_CHUNKS = 1


class _StoreView:
    """The two fields of a scheduler output that ``_build_store_jobs`` reads, with the requests filtered."""

    __slots__ = ("finished_req_ids", "num_scheduled_tokens")

    def __init__(self, num_scheduled_tokens: dict[str, int], finished_req_ids: Any) -> None:
        self.num_scheduled_tokens = num_scheduled_tokens
        self.finished_req_ids = finished_req_ids


class _CachedView:
    """``scheduled_cached_reqs`` as ``yield_req_data`` reads it, for the requests that changed."""

    __slots__ = ("new_block_ids", "req_ids", "resumed_req_ids")

    def __init__(self, req_ids: list[str], new_block_ids: list[Any], resumed_req_ids: Any) -> None:
        self.req_ids = req_ids
        self.new_block_ids = new_block_ids
        self.resumed_req_ids = resumed_req_ids


class _StatesView:
    """What ``_update_req_states`` reads of a scheduler output."""

    __slots__ = ("kv_cache_block_copies", "scheduled_cached_reqs", "scheduled_new_reqs")

    def __init__(self, out: Any, cached: _CachedView) -> None:
        self.scheduled_new_reqs = out.scheduled_new_reqs
        self.scheduled_cached_reqs = cached
        self.kv_cache_block_copies = getattr(out, "kv_cache_block_copies", None)  # (0.32+)


class WriteThrough:
    """The wrapped connector scheduler (see the module's docstring); made by :func:`install`."""

    def __init__(self, conn_sched: Any, every: int) -> None:
        self.every = every
        self._conn = conn_sched
        self._build = conn_sched._build_store_jobs
        self._update = conn_sched._update_req_states
        self._meta = conn_sched.build_connector_meta
        self._status: dict[str, Any] = conn_sched._req_status
        self._per_chunk = tuple(g.tokens_per_chunk for g in conn_sched.config.kv_group_configs)
        self._blocks_per_chunk: int = conn_sched.config.blocks_per_chunk
        self._one_group = len(self._per_chunk) == 1  # (the common case, tested inline in the per-step scan)
        self._preempted: dict[str, int] = {}  # request id -> tokens it had computed when preempted
        # Sliding-window groups re-check every request's pending blocks in _update_req_states: give it all of them.
        sparse = not conn_sched._sliding_window_groups
        self._sparse_states = sparse
        conn_sched._build_store_jobs = self._build_store_jobs
        if sparse:
            conn_sched._update_req_states = self._update_req_states
        if every > 1:
            conn_sched.build_connector_meta = self._build_connector_meta

    def preempted(self, req_id: str, num_computed_tokens: int) -> None:
        """Called as a request is preempted (before vLLM forgets what it had computed): its full chunks not yet
        stored go to the host with the next step, ahead of the forward that may reuse its blocks."""
        if self.every > 1:
            self._preempted[req_id] = num_computed_tokens

    def tails_pending(self) -> bool:
        """Whether a preempted request's tail waits for the next step (the engine must step even with nothing to
        run)."""
        return bool(self._preempted)

    def _restore(self, what: str) -> None:
        log.exception("offloading connector request state not recognised: its own %s is restored", what)
        self._conn._build_store_jobs = self._build
        self._conn._update_req_states = self._update
        self._conn.build_connector_meta = self._meta
        self.every = 1

    # -- the wrappers ---------------------------------------------------------------------------------

    def _update_req_states(self, scheduler_output: Any) -> Any:
        try:
            view = _StatesView(scheduler_output, self._changed(scheduler_output.scheduled_cached_reqs))
        except AttributeError:
            self._restore("request-state update")
            return self._update(scheduler_output)
        return self._update(view)

    def _build_store_jobs(self, scheduler_output: Any) -> Any:
        try:
            view = _StoreView(self._with_chunks(scheduler_output.num_scheduled_tokens),
                              self._finished(scheduler_output.finished_req_ids))  # fmt: skip
        except AttributeError:  # a request state of another shape: the connector's own walk, from now on
            self._restore("write-through scan")
            return self._build(scheduler_output)
        return self._build(view)

    def _build_connector_meta(self, scheduler_output: Any) -> Any:
        # A preempted request's tail is stored before the connector's own work, which flushes every pending job
        # of a preempted request (the worker submits and waits for them before the forward that may reuse the
        # blocks); vLLM's own scan stores nothing for it (it is not scheduled).
        tails: dict[int, Any] = {}
        if self._preempted:
            pending, self._preempted = self._preempted, {}
            scheduled = scheduler_output.num_scheduled_tokens
            for rid in scheduler_output.preempted_req_ids or ():
                n = pending.get(rid)
                st = self._status.get(rid)
                # (One admitted again in this same step found its blocks in the device prefix cache: it runs,
                # and its chunks are stored as it goes on.)
                if n is None or st is None or rid in scheduled or st.req.is_finished() or not self._due(st, n, 1):
                    continue
                if self._sparse_states:
                    st.update_offload_keys()
                # (computed tokens are 0 after a preemption: the view's scheduled count carries what it had)
                tails.update(self._build(_StoreView({rid: n}, ())))
        meta = self._meta(scheduler_output)
        if tails:
            meta.store_jobs.update(tails)
        return meta

    # -- which requests -------------------------------------------------------------------------------

    def _finished(self, finished: Any) -> Any:
        """The finished requests whose tail the connector may store: not one aborted with nothing computed that is
        not stored yet, and none whose device block list is shorter than the chunks the connector would take.

        vLLM 0.26's connector stores a finished request up to all of its tokens. An aborted request may have
        computed none of them: one paused (vLLM's own preemption, or the plugin's) keeps stale block ids of blocks
        other requests now hold, and one whose re-admission was tried (the connector clears its block ids then) but
        found no room, or a store job still in flight, has none at all. The first stored other requests' KV under
        its keys; the second failed the connector's assertion and killed the engine core (an H200 burst whose
        client gave up on 114 streams at once, docs/gpu-sittings.md, "Eleventh sitting"). vLLM 0.32 stores an
        aborted request up to its computed tokens, which this matches; a request left out here is dropped as the
        connector drops one with nothing to store."""
        if not finished:
            return finished
        get = self._status.get
        keep = []
        for rid in finished:
            st = get(rid)
            if st is None or self._storable(st):
                keep.append(rid)
            elif not st.transfer_jobs:  # (else the connector drops it as its last transfer ends)
                del self._status[rid]
        return keep

    def _storable(self, st: Any) -> bool:
        req = st.req
        if req.status is _ABORTED and not self._due(st, req.num_computed_tokens, 1):
            return False
        n, per_block = req.num_tokens, self._blocks_per_chunk
        return all(len(g.block_ids) >= n // c * per_block for c, g in zip(self._per_chunk, st.group_states))

    def _changed(self, cached: Any) -> _CachedView:
        ids, blocks, resumed = cached.req_ids, cached.new_block_ids, cached.resumed_req_ids
        keep = [i for i, b in enumerate(blocks) if b is not None and any(b)]
        if resumed:
            keep = sorted(set(keep).union(i for i, r in enumerate(ids) if r in resumed))
        return _CachedView([ids[i] for i in keep], [blocks[i] for i in keep], resumed)

    def _due(self, st: Any, done: int, every: int) -> bool:
        """Whether ``every`` full chunks not yet stored lie within the request's first ``done`` tokens."""
        return any(done // c - g.next_stored_chunk_idx >= every for c, g in zip(self._per_chunk, st.group_states))

    def _with_chunks(self, scheduled: dict[str, int]) -> dict[str, int]:
        keep: dict[str, int] = {}
        get = self._status.get
        every, sparse, one_group, tpc = self.every, self._sparse_states, self._one_group, self._per_chunk[0]
        for rid, n in scheduled.items():
            st = get(rid)
            if st is None:
                continue  # (the connector skips it too)
            # (A scheduled request is not finished: nothing finishes between schedule() and this call. The
            # connector stores a finished one from finished_req_ids, which passes unfiltered.)
            done = st.req.num_computed_tokens + n
            if one_group:
                if done // tpc - st.group_states[0].next_stored_chunk_idx < every:
                    continue
            elif not self._due(st, done, every):
                continue
            if sparse:
                st.update_offload_keys()  # (the keys of blocks filled since it was last passed)
            keep[rid] = n
        return keep


def install(conn_sched: Any, every: int = 1) -> WriteThrough | None:
    """Wrap the connector scheduler as described above; None (and nothing changed) if its internals are not the
    ones this was written for."""
    if every < 1:
        raise ValueError(f"store every {every} chunks: must be at least 1")
    status = getattr(conn_sched, "_req_status", None)
    groups = getattr(getattr(conn_sched, "config", None), "kv_group_configs", None)
    if not all(hasattr(conn_sched, a) for a in ("_build_store_jobs", "_update_req_states", "build_connector_meta",
                                                  "_sliding_window_groups")) or not isinstance(status, dict) or (
        not groups or any(not isinstance(getattr(g, "tokens_per_chunk", None), int) or g.tokens_per_chunk <= 0
                          for g in groups)
    ):
        log.warning("offloading connector internals not recognised: its write-through scan is left as it is")
        return None
    return WriteThrough(conn_sched, every)
