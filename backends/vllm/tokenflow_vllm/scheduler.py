"""Scheduler subclasses that take per-request commands from the gateway (docs/engine-control-api.md).

Use with ``--scheduler-cls tokenflow_vllm.scheduler.TokenFlowScheduler`` (synchronous scheduling: the CPU
build, or ``--no-async-scheduling``) or ``tokenflow_vllm.scheduler.TokenFlowAsyncScheduler`` (the CUDA
default, async scheduling). Commands arrive as EngineCore utility calls, which the engine processes
between steps on the scheduler's thread, so no locking is needed. A step may still be in flight when a
command runs (async scheduling keeps one queued ahead), which is what the phases below account for.

vLLM owns a request while it is queued, loading or running (phase ``ACTIVE``). The gateway's commands
move it through phases of its own, in which it sits in no vLLM queue:

- ``HELD``: preempted by the gateway. Device KV freed (vLLM's own ``_preempt_request``), still in
  ``self.requests`` so a client abort finds it. With write-through offload its host chunks are pinned
  against eviction while held.
- ``HOLD_ON_LOAD``: preempted while a host->device load is in flight; freeing blocks under the copy would
  corrupt them, so it becomes ``HELD`` when the load lands.
- ``REQUEUE``: resumed or prefetched. It re-enters vLLM's queue, at its head, at the next step boundary
  where that is safe: not in the same ``schedule()`` that reports its preemption (the offloading connector
  must see the preemption first), and once the output of a step computed before the preemption has
  landed (async scheduling; vLLM copes either way, but before then a re-admitted prefill cannot sample
  and costs a step for nothing, and 0.32+ hold such a request back themselves).
- ``PARKED``: prefetched: holds its device KV and computes nothing until ``resume``. One whose host copy was
  loaded parks only once a step computes up to its next token (delivered like any other), so that ``resume``
  is a single decode step, not a prefill of the last partial block; it leaves vLLM's running list at the next
  step boundary as a preemption that keeps its blocks (the model runner frees its slot at once, and gets it
  back with every block on resume; under async scheduling that step's output may still be on its way: it is
  ``loading`` until the token lands). One with nothing to load parks with whatever of its prefix the device
  cache still held.

vLLM version differences (queue names, call signatures) go through ``tokenflow_vllm.compat``.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from tokenflow_vllm import commands as cmds
from tokenflow_vllm import compat
from tokenflow_vllm.host_prefix import HostPrefixes
from tokenflow_vllm.offload import pins, store_scan
from tokenflow_vllm.rates import StepRates, StepTrace

log = logging.getLogger("tokenflow_vllm.scheduler")

XARGS_KEY = "tokenflow_id"
STORE_EVERY_KEY = "tokenflow_store_every_chunks"  # in kv_connector_extra_config
STEP_TRACE_ENV = "TOKENFLOW_STEP_TRACE"  # a file path: one JSON line per engine step (for cost models)


def _dumps(obj: Any) -> str:
    """JSON text; msgspec's encoder (a vLLM dependency) when present: a state report of hundreds of requests is
    built on the engine's thread, between steps, four times a second."""
    return _encode(obj).decode() if _encode is not None else json.dumps(obj)


try:
    from msgspec.json import encode as _encode
except ImportError:  # pragma: no cover (every supported vLLM installs msgspec)
    _encode = None


class Phase(enum.Enum):
    ACTIVE = "active"
    HELD = "held"
    HOLD_ON_LOAD = "hold_on_load"
    REQUEUE = "requeue"
    PARKED = "parked"


OUT_OF_QUEUE = (Phase.HELD, Phase.REQUEUE, Phase.PARKED)


@dataclass
class Tracked:
    """TokenFlow's view of one request that carries a ``tokenflow_id``."""

    tf_id: str
    req: Request
    phase: Phase = Phase.ACTIVE
    park: bool = False  # prefetched: once its KV is on device (and its next token computed), keep it from computing
    warm: bool = False  # prefetched and scheduled up to its next token: parks at the next step boundary
    kv_at_preempt: int = 0  # tokens with valid device KV when last preempted
    restore_pending: bool = False  # count restored/recomputed tokens at the next admission
    restore_external: int = 0  # tokens the connector loads from host for that admission
    pinned: tuple = ()  # host chunk keys pinned while held
    resumed_at: float | None = None  # perf_counter() of the last resume, until its next token
    resumed_output: int = 0  # output tokens at that resume
    resume_to_token_s: float | None = None  # engine-side time from the last resume to the next token
    # Where the time from the last resume to its next token went (seconds after the resume), filled as the
    # request passes each point: back in vLLM's queue, host->device load started and landed, first scheduled.
    resume_timeline: dict[str, float] = field(default_factory=dict)


class TokenFlowMixin:
    """The control logic; mixed into vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        compat.check_vllm_version()
        super().__init__(*args, **kwargs)
        self._tf: dict[str, Tracked] = {}  # internal request id -> tracked
        self._tf_ids: dict[str, str] = {}  # tokenflow id -> internal request id
        # Indexes kept by _move, so that per-step work and vLLM's per-iteration questions ("anything left to
        # do?") cost nothing per tracked request: hundreds are tracked, the engine loop runs ~100 times a second.
        self._tf_in_phase: Counter = Counter()  # phase -> requests in it
        self._tf_boundary: dict[str, Tracked] = {}  # requests _at_step_boundary must look at
        self._tf_resuming: dict[str, Tracked] = {}  # requests between a resume and their next token
        self._tf_pinned: dict[str, Tracked] = {}  # requests whose host chunks are pinned
        self._tf_restoring: dict[str, Tracked] = {}  # requests with restore_pending: counted at their admission
        self._tf_counters = dict.fromkeys(
            ("preemptions", "resumes", "prefetches", "aborts", "host_restored_tokens", "recomputed_tokens"), 0
        )
        self._tf_rates = StepRates()
        trace = os.environ.get(STEP_TRACE_ENV)
        self._tf_trace = StepTrace(trace) if trace else None
        self._tf_copy = {"h2d_bytes": 0.0, "h2d_s": 0.0, "d2h_bytes": 0.0, "d2h_s": 0.0}
        self._tf_kv_bytes_per_token = sum(
            len(g.layer_names) * g.kv_cache_spec.page_size_bytes // self.block_size
            for g in self.kv_cache_config.kv_cache_groups
        )
        self._tf_offload = self._find_offload_scheduler()
        groups = self._tf_offload.config.kv_group_configs if self._tf_offload is not None else None
        self._tf_hashes_per_chunk = groups[0].hashes_per_chunk if groups else 1
        self._tf_tokens_per_chunk = groups[0].tokens_per_chunk if groups else 0
        self._tf_write = store_scan.install(self._tf_offload, self._tf_store_every()) if self._tf_offload else None
        self._tf_device_blocks = compat.device_blocks(self)
        # Host-copy accounting, kept incremental: each live request's leading chunks verified on the host tier.
        self._host = HostPrefixes()
        if self.connector is not None:
            self._wrap_connector(self.connector)
        log.info(
            "TokenFlow scheduler ready (%s, policy=%s, host offload=%s)",
            type(self).__name__,
            self.policy.value,
            self._tf_offload is not None,
        )
    # ------------------------------------------------------------------ connector plumbing

    def _find_offload_scheduler(self) -> Any:
        """The OffloadingConnector's scheduler side, if that is the configured connector."""
        sched = getattr(self.connector, "connector_scheduler", None)
        if sched is None or not hasattr(sched, "manager") or not hasattr(sched, "config"):
            return None
        return sched

    def _tf_store_every(self) -> int:
        """Full chunks a request's write-through gathers before they go to the host: ``--kv-transfer-config``'s
        ``kv_connector_extra_config.tokenflow_store_every_chunks`` (store_scan.STORE_EVERY_CHUNKS if unset)."""
        kvt = self.vllm_config.kv_transfer_config
        extra = (kvt.kv_connector_extra_config if kvt is not None else None) or {}
        every = extra.get(STORE_EVERY_KEY, store_scan.STORE_EVERY_CHUNKS)
        if type(every) is not int or every < 1:
            raise ValueError(f"{STORE_EVERY_KEY} must be a positive integer, got {every!r}")
        return every

    def _wrap_connector(self, conn: Any) -> None:
        """Observe, without changing, what the connector loads and how fast it copies."""
        orig_alloc = conn.update_state_after_alloc
        orig_output = conn.update_connector_output

        def update_state_after_alloc(request, blocks, num_external_tokens):
            t = self._tf.get(request.request_id)
            if t is not None and t.restore_pending and num_external_tokens:
                # (a loaded request is allocated again, with 0 external tokens, when it is admitted to run)
                t.restore_external = num_external_tokens
            return orig_alloc(request, blocks, num_external_tokens)

        def update_connector_output(connector_output):
            meta = getattr(connector_output, "kv_connector_worker_meta", None)
            stats = getattr(meta, "transfer_stats", None)
            if stats is not None:
                for side, key in ((stats.load, "h2d"), (stats.store, "d2h")):
                    if not side.is_empty() and side.time > 0:
                        self._tf_copy[key + "_bytes"] += side.bytes
                        self._tf_copy[key + "_s"] += side.time
            return orig_output(connector_output)

        conn.update_state_after_alloc = update_state_after_alloc
        conn.update_connector_output = update_connector_output

    def _host_chunk_keys(self, req: Request, start: int = 0) -> Iterator[Any]:
        """Offload keys of the request's full chunks from chunk ``start`` on (first KV group), lazily: the
        host-copy check stops at the first chunk the tier lacks."""
        from vllm.v1.kv_offload.base import make_offload_key

        hpc, group = self._tf_hashes_per_chunk, self._tf_offload.config.kv_group_configs[0].group_idx
        hashes = req.block_hashes
        return (make_offload_key(hashes[i], group) for i in range(hpc - 1 + start * hpc, len(hashes), hpc))

    def _host_policy(self) -> Any:
        return getattr(self._tf_offload.manager, "_policy", None) if self._tf_offload else None

    def _sync_host(self) -> None:
        """Cut the verified host prefixes at the chunks that left the host tier since the last look.

        Chunks only leave through the eviction policy; PinnedLRU reports them. With another policy nothing
        is kept between state reports.
        """
        policy = self._host_policy()
        removed = pins.take_removed() if type(policy).__name__ == "PinnedLRU" else None
        if removed is None:
            self._host.clear()
        else:
            self._host.removed(removed)

    def _refresh_host(self, t: Tracked) -> None:
        """Extend the request's verified host prefix with chunks stored since the last look."""
        policy = self._host_policy()
        rid = t.req.request_id
        verified = self._host.length(rid)
        # (Runs for every live request at every state report: nothing more when no full chunk is left to look for.)
        if policy is None or verified >= len(t.req.block_hashes) // self._tf_hashes_per_chunk:
            return

        def present(key: Any) -> bool:
            chunk = policy.get(key)
            return chunk is not None and chunk.is_ready

        self._host.extend(rid, self._host_chunk_keys(t.req, verified), present)

    def _drop_host(self, t: Tracked) -> None:
        self._host.drop(t.req.request_id)

    def _host_tokens(self, t: Tracked) -> int:
        return min(self._host.length(t.req.request_id) * self._tf_tokens_per_chunk, t.req.num_tokens)

    def _pin(self, t: Tracked) -> None:
        if self._tf_offload is not None and not t.pinned:
            t.pinned = tuple(self._host_chunk_keys(t.req))
            pins.pin(t.pinned)
            self._tf_pinned[t.req.request_id] = t

    def _unpin(self, t: Tracked) -> None:
        if t.pinned:
            pins.unpin(t.pinned)
            t.pinned = ()
        self._tf_pinned.pop(t.req.request_id, None)

    # ------------------------------------------------------------------ request life cycle

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        xargs = request.sampling_params.extra_args if request.sampling_params else None
        tf_id = xargs.get(XARGS_KEY) if isinstance(xargs, dict) else None
        if isinstance(tf_id, str) and request.request_id in self.requests:
            old = self._tf_ids.get(tf_id)
            if old is not None and old != request.request_id:
                log.warning("tokenflow id %r reused while live; now refers to the newer request", tf_id)
            self._tf_ids[tf_id] = request.request_id
            self._tf[request.request_id] = Tracked(tf_id, request)
            self._tf_in_phase[Phase.ACTIVE] += 1

    def _free_request(self, request: Request, *args: Any, **kwargs: Any):
        # Runs for every finish: stop, max_tokens, client abort (also while held), control abort.
        t = self._tf.pop(request.request_id, None)
        if t is not None:
            self._tf_in_phase[t.phase] -= 1
            self._tf_boundary.pop(request.request_id, None)
            self._tf_resuming.pop(request.request_id, None)
            self._tf_restoring.pop(request.request_id, None)
            self._unpin(t)
            self._drop_host(t)
            if self._tf_ids.get(t.tf_id) == request.request_id:
                del self._tf_ids[t.tf_id]
        return super()._free_request(request, *args, **kwargs)

    # ------------------------------------------------------------------ keeping requests out of vLLM's queues

    def _move(self, t: Tracked, phase: Phase, park: bool | None = None) -> None:
        """Every change of a tracked request's phase or park flag goes through here (keeps the indexes)."""
        self._tf_in_phase[t.phase] -= 1
        t.phase = phase
        if park is not None:
            t.park = park
        if not t.park or phase is not Phase.ACTIVE:
            t.warm = False
        self._tf_in_phase[phase] += 1
        rid = t.req.request_id
        if phase is Phase.HOLD_ON_LOAD or phase is Phase.REQUEUE or (phase is Phase.ACTIVE and t.park):
            self._tf_boundary[rid] = t
        else:
            self._tf_boundary.pop(rid, None)

    def _num_out_of_queue(self) -> int:
        return sum(self._tf_in_phase[p] for p in OUT_OF_QUEUE)

    def get_num_unfinished_requests(self) -> int:
        # A request waiting to re-enter a queue needs the engine to step (that is where it re-enters), and so does
        # a preempted request's write-through tail (stored by the next step's connector metadata).
        tails = self._tf_write is not None and self._tf_write.tails_pending()
        return super().get_num_unfinished_requests() + self._tf_in_phase[Phase.REQUEUE] + tails

    def has_finished_requests(self) -> bool:
        # vLLM infers "finished, waiting on a delayed connector free" from requests that are in
        # self.requests but in no queue; held and parked requests look exactly like that and would make
        # the engine step forever. Discount them.
        if self.finished_req_ids:
            return True
        if self.connector is None:
            return False
        num_running, num_waiting = self.get_request_counts()
        return len(self.requests) - self._num_out_of_queue() > num_running + num_waiting

    def schedule(self, *args: Any, **kwargs: Any):
        self._at_step_boundary()
        out = super().schedule(*args, **kwargs)
        for t in self._tf_resuming.values():  # loads started by this schedule(), for the resume time line
            if t.req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self._mark(t, "load_started")
        # Only the few requests in a special state are looked at: the loop runs every step, and going over every
        # scheduled request costs the engine's thread time per running stream.
        scheduled = out.num_scheduled_tokens
        for rid, t in self._tf_resuming.items():
            if rid in scheduled:
                self._mark(t, "scheduled")
        for rid, t in self._tf_boundary.items():
            # Prefetched and admitted: it computes the rest of its context (the part the host copy lacks) and
            # parks once this step samples its next token. Its host copy stays pinned.
            req = t.req
            if t.park and t.phase is Phase.ACTIVE and rid in scheduled and req.num_computed_tokens >= req.num_tokens:
                t.warm = True
        for rid, t in list(self._tf_pinned.items()):
            if rid in scheduled and not t.park:  # computing again: its host copy no longer needs protection
                self._unpin(t)
        self._tf_rates.on_schedule(out)
        if self._tf_trace is not None:
            self._tf_trace.on_schedule(out, self.requests)
        return out

    def _at_step_boundary(self) -> None:
        """Move requests between TokenFlow's phases and vLLM's queues, before vLLM schedules a step."""
        for t in list(self._tf_boundary.values()):
            req = t.req
            if t.phase is Phase.HOLD_ON_LOAD and self._promote_loaded(req):
                self._release_device_kv(t)
                self._move(t, Phase.HELD)
                self._pin(t)
            elif t.phase is Phase.ACTIVE and t.warm:
                self._park_with_kv(t)  # its next token is computed (or on its way): no further step may take it
            elif t.phase is Phase.REQUEUE and self._may_requeue(req):
                compat.enqueue_front(self, req)
                self._move(t, Phase.ACTIVE)
                self._mark(t, "queued")

    def _park_with_kv(self, t: Tracked) -> None:
        """Take a running request out of the running list keeping its device KV: to vLLM, a preemption that kept
        every block (reported as one, so the model runner frees the request's slot at once and gets it back,
        blocks and tokens, when it is scheduled again; the offloading connector flushes its stores; a step still
        in flight delivers its token as for any preemption), so ``resume`` schedules one token."""
        req = t.req
        self.running.remove(req)
        self.prev_step_scheduled_req_ids.discard(req.request_id)
        req.status = RequestStatus.PREEMPTED
        self._inflight_prefills.discard(req)
        self.reset_preempted_req_ids.add(req.request_id)
        self._move(t, Phase.PARKED)

    def _restore_pending(self, t: Tracked, pending: bool) -> None:
        """Count what the request's next admission restores and recomputes (or stop counting it)."""
        t.restore_pending = pending
        t.restore_external = 0
        if pending:
            self._tf_restoring[t.req.request_id] = t
        else:
            self._tf_restoring.pop(t.req.request_id, None)

    def _mark(self, t: Tracked, point: str) -> None:
        if t.resumed_at is not None and point not in t.resume_timeline:
            t.resume_timeline[point] = time.perf_counter() - t.resumed_at

    def _promote_loaded(self, req: Request) -> bool:
        """If the request's host->device load has landed, make it an ordinary queued request holding that
        KV (what vLLM does when it next looks at it) and return True."""
        if req.status != RequestStatus.WAITING_FOR_REMOTE_KVS or req.request_id not in self.finished_recving_kv_req_ids:
            return False
        self._update_waiting_for_remote_kv(req)  # caches the loaded blocks (prefix cache)
        req.status = RequestStatus.PREEMPTED if req.num_preemptions else RequestStatus.WAITING
        return True

    def _may_requeue(self, req: Request) -> bool:
        return not compat.output_in_flight(req) and req.request_id not in self.reset_preempted_req_ids

    def _release_device_kv(self, t: Tracked) -> None:
        """Take a request that is not running out of every queue and free its device blocks."""
        req = t.req
        compat.dequeue(self, req)
        self._inflight_prefills.discard(req)
        t.kv_at_preempt = max(t.kv_at_preempt, req.num_computed_tokens)
        self._free_request_blocks(req)  # a no-op for a request without blocks
        req.num_computed_tokens = 0
        if req.num_preemptions:
            req.status = RequestStatus.PREEMPTED

    def _update_after_schedule(self, scheduler_output) -> None:
        # Before super() advances num_computed_tokens: what a re-admitted request already has on device
        # (local prefix hit + host load) versus what it had when preempted.
        scheduled = scheduler_output.num_scheduled_tokens
        for rid, t in list(self._tf_restoring.items()):
            if rid in scheduled:
                valid = t.req.num_computed_tokens
                restored = min(t.restore_external, valid)
                self._tf_counters["host_restored_tokens"] += restored
                self._tf_counters["recomputed_tokens"] += max(0, t.kv_at_preempt - valid)
                self._restore_pending(t, False)
        super()._update_after_schedule(scheduler_output)

    def update_from_output(self, scheduler_output, model_runner_output):
        out = super().update_from_output(scheduler_output, model_runner_output)
        self._tf_rates.on_output(scheduler_output)
        if self._tf_trace is not None:
            self._tf_trace.on_output(scheduler_output)
        now = time.perf_counter()
        if self._tf_resuming:
            for rid in self.finished_recving_kv_req_ids:
                t = self._tf_resuming.get(rid)
                if t is not None:
                    self._mark(t, "load_landed")
            for rid in scheduler_output.num_scheduled_tokens:
                t = self._tf_resuming.get(rid)
                if t is not None and t.req.num_output_tokens > t.resumed_output:
                    t.resume_to_token_s = now - t.resumed_at
                    t.resume_timeline["token"] = t.resume_to_token_s
                    t.resumed_at = None
                    del self._tf_resuming[rid]
        return out

    def _preempt_request(self, request: Request, timestamp: float, *args: Any, **kwargs: Any) -> None:
        # Every preemption, the engine's own (KV exhausted) included: count it and remember how much KV
        # the request had, to tell restored from recomputed tokens when it is re-admitted.
        t = self._tf.get(request.request_id)
        if t is not None:
            t.kv_at_preempt = request.num_computed_tokens
            self._restore_pending(t, True)
            t.warm = False  # (a prefetched request the engine itself preempted is queued again, not parked)
        if self._tf_write is not None:
            self._tf_write.preempted(request.request_id, request.num_computed_tokens)
        self._tf_counters["preemptions"] += 1
        super()._preempt_request(request, timestamp, *args, **kwargs)

    def finish_requests(self, request_ids, finished_status):
        done = super().finish_requests(request_ids, finished_status)
        if finished_status == RequestStatus.FINISHED_ABORTED:
            self._tf_counters["aborts"] += len(done)  # abort commands and client disconnects
        return done

    # ------------------------------------------------------------------ commands

    def _status(self, t: Tracked) -> str:
        phase = t.phase
        if phase is Phase.HELD or phase is Phase.HOLD_ON_LOAD:
            return "held"
        if phase is Phase.PARKED:  # ready once the token computed before it parked has landed
            return "loading" if compat.output_in_flight(t.req) else "parked"
        if phase is Phase.REQUEUE:
            return "loading" if t.park else "waiting"
        if t.park:  # being made ready: loading, or computing up to its next token
            return "loading"
        st = t.req.status
        if st == RequestStatus.RUNNING:
            return "running"
        if st == RequestStatus.WAITING_FOR_REMOTE_KVS:
            return "loading"
        return "waiting"

    def _preempt(self, t: Tracked) -> None:
        req = t.req
        phase = t.phase
        if phase is Phase.HELD or phase is Phase.HOLD_ON_LOAD:
            return
        if phase is Phase.ACTIVE and req.status == RequestStatus.RUNNING:
            self._preempt_running(t)  # counted by _preempt_request, like the engine's own preemptions
        elif phase is Phase.ACTIVE and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            self._tf_counters["preemptions"] += 1
            self._move(t, Phase.HOLD_ON_LOAD, park=False)  # held once the copy lands (_at_step_boundary)
            return
        else:  # queued, requeued or parked: free whatever device KV it holds
            self._tf_counters["preemptions"] += 1
            self._release_device_kv(t)
        self._move(t, Phase.HELD, park=False)
        self._pin(t)

    def _preempt_running(self, t: Tracked) -> None:
        req = t.req
        # vLLM's own preemption: frees blocks (deferred while a step in flight may still write them), makes
        # the offloading connector flush the unwritten tail, re-queues; then we take it out of the queue.
        # The running list is restored if vLLM's call fails, so a failed command leaves no half-state.
        i = self.running.index(req)
        self.running.pop(i)
        try:
            self._preempt_request(req, time.monotonic())
        except BaseException:
            self.running.insert(i, req)
            raise
        compat.dequeue(self, req)
        self.prev_step_scheduled_req_ids.discard(req.request_id)

    def _requeue(self, t: Tracked, park: bool) -> None:
        # Pins stay until it computes again (see schedule): loading and parked requests keep their copy.
        self._move(t, Phase.REQUEUE, park=park)
        self._restore_pending(t, True)

    def _resume(self, t: Tracked) -> None:
        phase = t.phase
        if phase is Phase.ACTIVE or phase is Phase.REQUEUE:
            if t.park:  # prefetched, not parked yet: run as soon as its load lands (or simply go on running)
                self._tf_counters["resumes"] += 1
                self._move(t, phase, park=False)
                self._mark_resume(t)
            return
        self._tf_counters["resumes"] += 1
        self._mark_resume(t)
        if phase is Phase.HOLD_ON_LOAD:
            self._move(t, Phase.ACTIVE)  # the load it was waiting for lands as a normal admission
        else:  # HELD or PARKED
            self._requeue(t, park=False)

    def _mark_resume(self, t: Tracked) -> None:
        t.resumed_at = time.perf_counter()
        t.resumed_output = t.req.num_output_tokens
        t.resume_timeline = {}
        self._tf_resuming[t.req.request_id] = t

    def _prefetch(self, t: Tracked) -> None:
        if t.phase is not Phase.HELD:
            return
        self._tf_counters["prefetches"] += 1
        req = t.req
        if self._needs_load(req):
            self._requeue(t, park=True)
            return
        # Nothing to copy from host. Claim what the device prefix cache still holds of it, so the parked
        # request really owns that KV (nothing can evict it) and resume computes only the rest. vLLM
        # allocates only with a token to compute: claim the slot of the first one resume will compute
        # (a hit always stops short of the last known token).
        blocks, n_local = compat.local_prefix_hit(self, req)
        if n_local > 0 and (
            self.kv_cache_manager.allocate_slots(req, 1, num_new_computed_tokens=n_local, new_computed_blocks=blocks)
            is not None
        ):
            req.num_computed_tokens = n_local
            self._restore_pending(t, True)
        self._move(t, Phase.PARKED)  # with no device KV at all, resume recomputes (or reloads, if it can by then)

    def _needs_load(self, req: Request) -> bool:
        """Whether admission would load KV from host beyond the device prefix-cache hit."""
        if self.connector is None:
            return False
        _, n_local = compat.local_prefix_hit(self, req)
        tail = n_local % self.block_size
        ext, _ = self.connector.get_num_new_matched_tokens(req, n_local - tail)
        return ext is None or ext > tail

    def _set_priority(self, t: Tracked, priority: int) -> None:
        req = t.req
        if self.policy == SchedulingPolicy.PRIORITY and t.phase is Phase.ACTIVE:
            for q in (self.waiting, compat.side_queue(self)):
                if any(r is req for r in q):
                    q.remove_request(req)
                    req.priority = priority
                    q.add_request(req)
                    return
        req.priority = priority

    def _abort(self, t: Tracked) -> None:
        self.finish_requests(t.req.request_id, RequestStatus.FINISHED_ABORTED)

    def tokenflow_apply(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply commands in order; return results plus the internal ids of aborted requests."""
        results: list[dict[str, Any]] = []
        aborted: list[str] = []
        for cmd in commands:
            bad = cmds.validate(cmd)
            if bad is not None:
                results.append(bad)
                continue
            op, tf_id = cmd["op"], cmd["id"]
            rid = self._tf_ids.get(tf_id)
            t = self._tf.get(rid) if rid is not None else None
            if t is None or t.req.is_finished():
                results.append(cmds.not_found(tf_id, op))
                continue
            try:
                if op == "abort":
                    self._abort(t)
                    aborted.append(rid)
                    results.append({"id": tf_id, "op": op, "ok": True, "status": "aborted"})
                    continue
                if op == "preempt":
                    self._preempt(t)
                elif op == "resume":
                    self._resume(t)
                elif op == "prefetch":
                    self._prefetch(t)
                else:
                    self._set_priority(t, cmd["priority"])
            except Exception as e:  # never take the engine down for one command
                log.exception("tokenflow %s %s failed", op, tf_id)
                results.append(cmds.error_result(tf_id, op, "internal_error", f"{type(e).__name__}: {e}"))
                continue
            results.append({"id": tf_id, "op": op, "ok": True, "status": self._status(t)})
        return {"results": results, "aborted_request_ids": aborted}

    # ------------------------------------------------------------------ state

    def _request_state(self, t: Tracked) -> dict[str, Any]:
        req = t.req
        status = self._status(t)
        device = computed = 0
        if status in ("running", "parked", "loading") or t.phase is Phase.REQUEUE:
            blocks = self._tf_device_blocks.get(req.request_id)
            device = len(blocks) * self.block_size if blocks else 0  # allocated: what a preempt would free
            computed = req.num_computed_tokens if status != "loading" else 0
        return {
            "id": t.tf_id,
            "status": status,
            "priority": req.priority,
            "arrival_time": req.arrival_time,
            "prompt_tokens": req.num_prompt_tokens,
            "output_tokens": req.num_output_tokens,
            "computed_tokens": computed,
            "max_tokens": req.sampling_params.max_tokens if req.sampling_params else None,
            "kv_device_tokens": device,
            "kv_host_tokens": self._host_tokens(t),
            "preemptions": req.num_preemptions,
            "resume_to_token_s": t.resume_to_token_s,  # beyond the contract: last resume -> next token
            "resume_timeline_s": t.resume_timeline or None,  # beyond the contract: where that time went
            "request_id": req.request_id,
        }

    def _tf_name(self) -> str:
        name = self.vllm_config.model_config.served_model_name
        return name[0] if isinstance(name, (list, tuple)) else str(name)

    def tokenflow_state(self, request_id: str | None = None) -> dict[str, Any]:
        self._sync_host()
        if request_id is not None:
            rid = self._tf_ids.get(request_id)
            t = self._tf.get(rid) if rid is not None else None
            if t is None or t.req.is_finished():
                return {"request": None}
            self._refresh_host(t)
            return {"request": self._request_state(t)}
        live = [t for t in self._tf.values() if not t.req.is_finished()]
        for t in live:
            self._refresh_host(t)
        reqs = [self._request_state(t) for t in live]
        counts = dict.fromkeys(("running", "waiting", "held", "loading", "parked"), 0)
        for r in reqs:
            counts[r["status"]] += 1
        pool = self.kv_cache_manager.block_pool
        dev_cap = (pool.num_gpu_blocks - 1) * self.block_size  # one block is vLLM's null block
        dev_used = (pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()) * self.block_size
        # Host tier, like the device prefix cache: chunks no live request refers to are a reusable cache,
        # reported as free ("cached"); "used" is what live requests' KV occupies.
        host_cap = host_used = host_cached = 0
        if self._tf_offload is not None:
            m = self._tf_offload.manager
            per_chunk = self._tf_tokens_per_chunk
            host_used = self._host.distinct() * per_chunk  # distinct chunks: shared prefixes count once
            chunks = compat.host_tier_chunks(m)
            if chunks is not None:
                host_cap, host_cached = (n * per_chunk for n in chunks)
        c = self._tf_copy
        engine = {
            "name": self._tf_name(),
            "kind": "vllm",
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_running_reqs,
            "kv_bytes_per_token": self._tf_kv_bytes_per_token,
            "kv_device_capacity_tokens": dev_cap,
            "kv_device_used_tokens": dev_used,
            "kv_host_capacity_tokens": host_cap,
            "kv_host_used_tokens": host_used,
            "kv_host_cached_tokens": host_cached,
            "kv_host_pinned_chunks": pins.count(),
            "num_running": counts["running"],
            "num_waiting": counts["waiting"],
            "num_held": counts["held"],
            "num_loading": counts["loading"],
            "num_parked": counts["parked"],
            **self._tf_rates.report(),
            "h2d_bytes_per_s": c["h2d_bytes"] / c["h2d_s"] if c["h2d_s"] > 0 else None,
            "d2h_bytes_per_s": c["d2h_bytes"] / c["d2h_s"] if c["d2h_s"] > 0 else None,
            "counters": dict(self._tf_counters),
        }
        return {"engine": engine, "requests": reqs}

    def tokenflow_call(self, payload: str) -> str:
        """Entry point of the EngineCore utility: JSON in, JSON out (keeps msgpack out of the way)."""
        msg = json.loads(payload)
        kind = msg.get("kind")
        if kind == "commands":
            return _dumps(self.tokenflow_apply(msg["commands"]))
        if kind == "state":
            return _dumps(self.tokenflow_state(msg.get("id")))
        return _dumps({"error": f"unknown call {kind!r}"})


class TokenFlowScheduler(TokenFlowMixin, Scheduler):
    """For synchronous scheduling (the CPU build; CUDA with ``--no-async-scheduling``)."""


class TokenFlowAsyncScheduler(TokenFlowMixin, AsyncScheduler):
    """For async scheduling (the CUDA default in vLLM 0.33). Untested on GPU so far: see docs."""
