"""A cheaper write-through scan for vLLM's offloading connector: only requests with a chunk to store reach it.

Every step, the connector's scheduler side (``OffloadingConnectorScheduler._build_store_jobs``) walks every
scheduled request to find full chunks not yet stored, with a dozen calls and slices per request. While decoding,
a request completes a chunk once every ``tokens_per_chunk`` steps (16 with vLLM's default block size), so nearly
all of that walk finds nothing: at 256 decoding streams it was most of the plugin's added time per step
(docs/vllm-backend.md, "Scheduler cost per step"). This hands the connector only the requests that may have a
chunk to store, which is exact: a skipped request is one for which the connector would have stored nothing and
moved nothing (its stored-chunk index only moves up to what it could store).

A request is skipped when it is not finished and, in every KV group, the tokens it will have computed after this
step fill no chunk beyond those already stored: ``(computed + scheduled) // tokens_per_chunk <= next_stored``.
The connector can store less than that (offload caps, prompt-only offload, the eagle group's last chunk), never
more, so the bound only skips requests it would skip too. Finished requests always go through.

Relies on the connector's private state (``_req_status``, each request's ``group_states[i].next_stored_chunk_idx``,
``config.kv_group_configs[i].tokens_per_chunk``) and on ``_build_store_jobs`` reading only ``num_scheduled_tokens``
and ``finished_req_ids`` of the scheduler output, as vLLM 0.26 and 0.32 do; :func:`install` checks for them and
leaves the connector alone if they are not there.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tokenflow_vllm.offload")


class _StoreView:
    """The two fields of a scheduler output that ``_build_store_jobs`` reads, with the requests filtered."""

    __slots__ = ("finished_req_ids", "num_scheduled_tokens")

    def __init__(self, num_scheduled_tokens: dict[str, int], finished_req_ids: Any) -> None:
        self.num_scheduled_tokens = num_scheduled_tokens
        self.finished_req_ids = finished_req_ids


def install(conn_sched: Any) -> bool:
    """Wrap the connector scheduler's ``_build_store_jobs`` with the filter; False (and nothing changed) if its
    internals are not the ones this was written for."""
    build = getattr(conn_sched, "_build_store_jobs", None)
    status = getattr(conn_sched, "_req_status", None)
    groups = getattr(getattr(conn_sched, "config", None), "kv_group_configs", None)
    if build is None or not isinstance(status, dict) or not groups or any(
        not isinstance(getattr(g, "tokens_per_chunk", None), int) or g.tokens_per_chunk <= 0 for g in groups
    ):
        log.warning("offloading connector internals not recognised: its write-through scan is left as it is")
        return False
    per_chunk = tuple(g.tokens_per_chunk for g in groups)
    one_group = len(per_chunk) == 1
    tpc = per_chunk[0]

    def build_store_jobs(scheduler_output: Any) -> Any:
        try:
            view = _StoreView(_with_chunks(scheduler_output.num_scheduled_tokens),
                              scheduler_output.finished_req_ids)  # fmt: skip
        except AttributeError:  # a request state of another shape: the connector's own walk, from now on
            log.exception("offloading connector request state not recognised: its write-through scan is restored")
            conn_sched._build_store_jobs = build
            return build(scheduler_output)
        return build(view)

    def _with_chunks(scheduled: dict[str, int]) -> dict[str, int]:
        keep: dict[str, int] = {}
        get = status.get
        for rid, n in scheduled.items():
            st = get(rid)
            if st is None:
                continue  # (the connector skips it too)
            req = st.req
            done = req.num_computed_tokens + n
            if one_group:
                if done // tpc <= st.group_states[0].next_stored_chunk_idx and not req.is_finished():
                    continue
            elif not req.is_finished() and all(
                done // c <= g.next_stored_chunk_idx for c, g in zip(per_chunk, st.group_states, strict=True)
            ):
                continue
            keep[rid] = n
        return keep

    conn_sched._build_store_jobs = build_store_jobs
    return True
