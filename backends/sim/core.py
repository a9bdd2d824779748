"""EngineCore: a pure model of a vLLM-v1-like engine with a write-through host KV tier.

No clock reads, no asyncio, no I/O: every method that depends on time takes ``now`` (seconds, in whatever
clock the caller uses). The HTTP server (``server.py``, wall clock) and the virtual-clock runner
(``virtual.py``) are thin shells around one instance.

Driving it::

    core = EngineCore(load_profile("sim-small"))
    core.add("r1", prompt_tokens=100, max_tokens=50, priority=0, now=t)
    step = core.next_step(t)          # None when there is nothing to compute now
    # ... the step runs for step.duration seconds ...
    emitted = core.complete_step(step, t + step.duration)   # tokens produced, finishes
    core.command("preempt", "r1", now)                       # only between steps

Between ``next_step`` and ``complete_step`` a step is *in flight*: ``add`` and ``state`` are allowed, but
``command`` and ``abort`` raise :class:`StepInFlight` (the shells queue them for the step boundary, which is
where the contract applies commands). When ``next_step`` returns None, ``next_event_time()`` says when
something will change on its own (a host->device load finishing), or None if only new work or a command
can wake the engine.

Scheduling follows vLLM v1 (see docs/sim-cost-model.md for the full description):

1. running requests first, in admission order: each gets ``min(remaining, token budget)`` tokens (one when
   decoding; a chunk when prefilling). A request that needs a new KV block when none is free preempts the
   running request with the highest ``(priority, arrival)`` (lowest priority, newest), possibly itself;
2. then, if nothing was preempted, waiting requests are admitted in ``(priority, started-before, arrival)``
   order while blocks, ``max_num_seqs`` and the token budget allow (head-of-line blocking as in vLLM).

A token is emitted at the end of the step in which a request's computed tokens reach its total length:
the step that completes the prefill emits the first token, every decode step emits one more.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from . import plugin_rates
from .profile import Profile

WAITING = "waiting"
RUNNING = "running"
LOADING = "loading"
HELD = "held"
PARKED = "parked"
FINISHED = "finished"

OPS = ("preempt", "resume", "prefetch", "priority", "abort")


class DuplicateId(ValueError):
    """A live request already has this id."""


class StepInFlight(RuntimeError):
    """A command was issued between next_step and complete_step."""


class Emitted(NamedTuple):
    """One output token of one request, produced by a step."""

    id: str
    position: int  # 0-based position in the request's output (a NamedTuple field may not be called index)
    finish_reason: str | None  # "length" when this token ends the request, else None


class _Req:
    __slots__ = (
        "after_load",
        "arrival",
        "cached",
        "centry",
        "computed",
        "flush_done",
        "high",
        "host",
        "id",
        "limit",
        "load_base",
        "load_finish",
        "load_tokens",
        "max_tokens",
        "num_tokens",
        "output",
        "preemptions",
        "priority",
        "prompt",
        "qver",
        "seq",
        "slots",
        "started",
        "status",
    )

    def __init__(
        self, rid: str, prompt: int, max_tokens: int | None, limit: int, priority: int, now: float, seq: int
    ) -> None:
        self.id = rid
        self.prompt = prompt
        self.max_tokens = max_tokens  # the limit reported in state() (None: only max_model_len)
        self.limit = limit  # output tokens after which the request finishes
        self.priority = priority
        self.arrival = now
        self.seq = seq
        self.output = 0
        self.num_tokens = prompt  # prompt + output
        self.computed = 0  # tokens with valid KV on the device
        self.high = 0  # most tokens ever computed (to count recomputation)
        self.slots = 0  # device KV allocated, tokens (whole blocks)
        self.host = 0  # tokens of KV synced to host (a prefix)
        self.status = WAITING
        self.started = False  # preempted or resumed before: queued ahead of new arrivals
        self.preemptions = 0
        self.qver = 0  # waiting-heap entry version (lazy deletion)
        self.after_load = RUNNING  # RUNNING (resume) or PARKED (prefetch)
        self.load_tokens = 0
        self.load_base = 0  # tokens of load_tokens already on the device (a prefix cache hit), not copied
        self.load_finish = 0.0
        self.flush_done = 0.0
        self.cached = 0  # blocks of its prefix left on the device after a preemption (prefix cache), reusable
        self.centry: list[Any] | None = None  # its segment of the free-block queue while cached


@dataclass(slots=True)
class Step:
    """One engine iteration, from :meth:`EngineCore.next_step` to :meth:`EngineCore.complete_step`."""

    start: float
    duration: float
    reqs: list[_Req]
    ns: list[int]  # tokens scheduled per request, parallel to reqs
    scheduled_tokens: int
    prefill_tokens: int
    decode_reqs: int
    attended_kv_tokens: int
    stall_s: float  # synchronous preemption flush included in duration

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.reqs]


@dataclass(slots=True)
class Counters:
    preemptions: int = 0
    resumes: int = 0
    prefetches: int = 0
    aborts: int = 0
    host_restored_tokens: int = 0
    recomputed_tokens: int = 0


# Profile.prefill_rate_measure "prompt_steps", the vLLM plugin's measure of 2026-12-04 (until the fitted slope):
# tokens over the whole time of the last PROMPT_STEP_SAMPLES steps with at least PROMPT_STEP_MIN_TOKENS prompt
# tokens and no more decodes than those; every step with prompt work (averaged 0.1 a step) until the first.
PROMPT_STEP_MIN_TOKENS = 256
PROMPT_STEP_SAMPLES = 16


@dataclass(slots=True)
class _Window:
    """Sums over the last ``size`` steps, for the measured rates in state()."""

    size: int
    items: deque[tuple[float, int, int, float]] = field(default_factory=deque)
    dur: float = 0.0
    decode: int = 0
    prefill: int = 0
    prefill_dur: float = 0.0
    # Steps without prompt work, as the vLLM plugin reports them (an average weighting the newest step 0.1,
    # kept across windows of prefill-only steps): a burst's prefill steps are no decode-speed sample.
    decode_step: float | None = None
    # The prefill rate over the last window that had prefill work: a window of decode-only steps keeps it, as the
    # plugin's average does (null there read as "unknown" and priced every prompt at the policy's default rate).
    prefill_rate: float | None = None
    measure: str = "marginal"  # Profile.prefill_rate_measure
    # "fitted": the vLLM plugin's own accounting (its StepRates), fed every step
    plugin: Any = None
    # "prompt_steps": (prompt tokens, seconds) of the last PROMPT_STEP_SAMPLES steps that mostly computed prompt
    prompt_steps: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=PROMPT_STEP_SAMPLES))

    def add(self, dur: float, decode: int, prefill: int, pdur: float) -> None:
        if not prefill:
            ds = self.decode_step
            self.decode_step = dur if ds is None else ds + 0.1 * (dur - ds)
        self.items.append((dur, decode, prefill, pdur))
        self.dur += dur
        self.decode += decode
        self.prefill += prefill
        self.prefill_dur += pdur
        if len(self.items) > self.size:
            d, dc, pf, pd = self.items.popleft()
            self.dur -= d
            self.decode -= dc
            self.prefill -= pf
            self.prefill_dur -= pd
        if self.measure == "fitted":
            if dur > 0:
                self.plugin.add_step(decode, prefill, dur)
        elif self.measure != "marginal":
            if prefill and dur > 0:
                if self.measure == "prompt_steps" and prefill >= PROMPT_STEP_MIN_TOKENS and prefill >= decode:
                    ps = self.prompt_steps
                    ps.append((prefill, dur))
                    self.prefill_rate = sum(p for p, _ in ps) / sum(t for _, t in ps)
                elif self.measure == "whole_steps" or not self.prompt_steps:
                    pr = self.prefill_rate
                    self.prefill_rate = prefill / dur if pr is None else pr + 0.1 * (prefill / dur - pr)
        elif self.prefill > 0 and self.prefill_dur > 0:
            self.prefill_rate = self.prefill / self.prefill_dur

    def prefill_tokens_per_s(self) -> float | None:
        return self.plugin.prefill_rate if self.measure == "fitted" else self.prefill_rate


def _victim_key(r: _Req) -> tuple[int, int]:
    return (r.priority, r.seq)


def _queue_key(r: _Req, loaded_first: bool = True) -> tuple[int, int, int]:
    """Waiting order: requests already holding device KV (reloaded) first, as vLLM drains its
    kv-holding queue first; then priority; then requests that ran before ahead of new arrivals.
    Without ``loaded_first`` (vLLM 0.26: one priority queue) only priority, then arrival."""
    if not loaded_first:
        return (1, r.priority, 1)
    return (0 if r.slots else 1, r.priority, 0 if r.started else 1)


class EngineCore:
    """See the module docstring."""

    def __init__(
        self,
        profile: Profile,
        *,
        default_max_tokens: int | None = None,
        write_through: bool = True,
        engine_preempt: Literal["recompute", "offload"] = "recompute",
        stats_window: int = 32,
        clock_offset: float = 0.0,
    ) -> None:
        """
        default_max_tokens: output limit for requests that set none (always capped by max_model_len).
        write_through: copy KV to host as it is produced (False: no host tier; resume recomputes).
        engine_preempt: what the engine's own preemption (KV exhausted) does with the victim's KV:
            "recompute" drops it, as plain vLLM does; "offload" keeps the host copy (flushing the tail) and
            restores it on re-admission, as vLLM with a write-through offloading connector does.
        clock_offset: added to arrival times in state() (the server runs the core on a monotonic clock
            and reports epoch times).
        """
        if engine_preempt not in ("recompute", "offload"):
            raise ValueError("engine_preempt must be 'recompute' or 'offload'")
        self.profile = profile
        self.default_max_tokens = default_max_tokens
        self.write_through = write_through
        self.engine_preempt = engine_preempt
        self.clock_offset = clock_offset
        self.bs = profile.block_size
        self.total_blocks = profile.device_blocks
        self.free_blocks = self.total_blocks
        self.host_cap = profile.host_tokens if write_through else 0
        self.host_used = 0
        self.d2h_tokens_per_s = profile.d2h_bytes_per_s / profile.kv_bytes_per_token
        self.reqs: dict[str, _Req] = {}
        self.running: list[_Req] = []
        self.waiting: list[tuple[tuple[int, int, int], int, int, _Req]] = []  # heap, see _queue_key
        self.n_waiting = 0
        self.loads: deque[_Req] = deque()  # loads in flight, finish times increasing (one FIFO channel)
        self.load_pending: deque[_Req] = deque()  # prefetches waiting for free blocks
        self.lru: OrderedDict[str, _Req] = OrderedDict()  # evictable host copies (running requests)
        self.h2d_free_at = 0.0
        self.stall_until = 0.0  # a synchronous flush blocks the engine until then
        # engine preemption modes (profile section ``engine:``, docs/sim-cost-model.md)
        self.cascade = profile.preempt_cascade
        self.pcache = profile.prefix_cache
        self.loaded_first = profile.loaded_first
        self.frozen = 0  # blocks freed by this step's preemptions, usable from the next step on (cascade)
        self.cached_blocks = 0  # free blocks still holding a preempted request's prefix (a subset of free_blocks)
        # the free-block queue in vLLM's order, as segments [owner or None, blocks]: allocation takes from the
        # front (oldest freed first), so a preempted request's prefix survives until the queue reaches it
        self.free_queue: deque[list[Any]] = deque([[None, self.total_blocks]])
        self.preempt_stall = 0.0  # engine time owed since the last step: preemptions (profile.preempt_s each) and
        #   control reads (read_state)
        self.counters = Counters()
        measure = profile.prefill_rate_measure
        self.window = _Window(stats_window, measure=measure,
                              plugin=plugin_rates.module().StepRates() if measure == "fitted" else None)
        self.host_chunk = profile.host_copy_tokens  # the host tier copies whole chunks (Profile.host_copy_tokens)
        self.steps = 0
        self._seq = 0
        self._inflight: Step | None = None

    # ------------------------------------------------------------------ requests

    def add(
        self, req_id: str, prompt_tokens: int, max_tokens: int | None = None, priority: int = 0, now: float = 0.0
    ) -> None:
        """Queue a new request. Raises DuplicateId, or ValueError for lengths the model cannot serve."""
        if req_id in self.reqs:
            raise DuplicateId(f"request id '{req_id}' is already live")
        mml = self.profile.max_model_len
        if prompt_tokens < 1:
            raise ValueError("prompt must have at least one token")
        if prompt_tokens >= mml:
            raise ValueError(f"prompt of {prompt_tokens} tokens leaves no room in max_model_len {mml}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        limit = mml - prompt_tokens
        cap = max_tokens if max_tokens is not None else self.default_max_tokens
        if cap is not None and cap < limit:
            limit = cap
        self._seq += 1
        # state() reports the limit applied (the request's, else the default, capped by max_model_len);
        # null only when max_model_len is the sole limit
        shown = limit if cap is not None else None
        req = _Req(req_id, prompt_tokens, shown, limit, priority, now, self._seq)
        self.reqs[req_id] = req
        self._push_waiting(req)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.reqs

    def status(self, req_id: str) -> str | None:
        req = self.reqs.get(req_id)
        return req.status if req else None

    def output_tokens(self, req_id: str) -> int | None:
        req = self.reqs.get(req_id)
        return req.output if req else None

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    def has_work(self) -> bool:
        """True when a step could be scheduled (running or waiting requests exist)."""
        return bool(self.running) or self.n_waiting > 0

    def next_event_time(self) -> float | None:
        """When a load in flight finishes (the next change that needs no new input)."""
        return self.loads[0].load_finish if self.loads else None

    # ------------------------------------------------------------------ the step

    def next_step(self, now: float) -> Step | None:
        """Schedule one step starting at ``now``; None when nothing can be computed."""
        if self._inflight is not None:
            raise StepInFlight("complete the step in flight first")
        if self.loads or self.load_pending:
            self._poll_loads(now)
        self.frozen = 0
        if not self.running and self.n_waiting == 0:
            return None
        bs = self.bs
        budget = self.profile.max_num_batched_tokens
        reqs: list[_Req] = []
        ns: list[int] = []
        sched = 0
        prefill = 0
        decode = 0
        attended = 0
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            need = req.num_tokens - req.computed
            n = need if need < budget else budget
            target = req.computed + n
            if target > req.slots:
                nb = (target - req.slots + bs - 1) // bs
                if nb > self.free_blocks - self.frozen:
                    preempted = True
                    self_victim = False
                    while nb > self.free_blocks - self.frozen:
                        victim = max(running, key=_victim_key)
                        vi = running.index(victim)
                        if vi < i:  # already scheduled this step: take back its tokens
                            k = reqs.index(victim)
                            vn = ns[k]
                            if vn == 1 and victim.computed + 1 == victim.num_tokens:
                                decode -= 1
                                attended -= victim.num_tokens
                            else:
                                prefill -= vn
                            sched -= vn
                            budget += vn
                            del reqs[k]
                            del ns[k]
                            i -= 1
                        del running[vi]
                        self._engine_preempt(victim, now)
                        if victim is req:
                            self_victim = True
                            break
                    if self_victim:
                        if self.cascade:
                            break  # as vLLM: the request that could not be scheduled ends the running pass
                        continue
                    # budget may have grown (a scheduled victim gave tokens back); keep n as computed
                self._take(nb)
                req.slots += nb * bs
            reqs.append(req)
            ns.append(n)
            budget -= n
            sched += n
            if need == 1:
                decode += 1
                attended += req.num_tokens
            else:
                prefill += n
            i += 1

        if not preempted and self.n_waiting and budget > 0:
            max_seqs = self.profile.max_num_seqs
            heap = self.waiting
            while heap and budget > 0 and len(running) < max_seqs:
                entry = heap[0]
                req = entry[3]
                if req.status is not WAITING or entry[2] != req.qver:
                    heapq.heappop(heap)
                    continue
                if req.cached:
                    k = req.cached
                    if self._cache_covers_host(req):
                        # the device still holds its prefix (prefix cache hit): take those blocks back
                        need = req.num_tokens - k * bs
                        n = need if need < budget else budget
                        nb = -(-(k * bs + n) // bs) - k
                        if k + nb > self.free_blocks:
                            break
                        self._reclaim(req)
                    elif self._prefer_load(req, now, k * bs):
                        # part on the device, the rest on host: take the blocks back, load the rest
                        if -(-req.host // bs) > self.free_blocks:
                            break
                        heapq.heappop(heap)
                        self.n_waiting -= 1
                        self._reclaim(req)
                        self._start_load(req, now, RUNNING)
                        continue
                    else:
                        self._drop_cache(req)
                if req.slots == 0 and req.host > 0 and self._prefer_load(req, now):
                    if -(-req.host // bs) > self.free_blocks:
                        break
                    heapq.heappop(heap)
                    self.n_waiting -= 1
                    self._start_load(req, now, RUNNING)
                    continue
                need = req.num_tokens - req.computed
                n = need if need < budget else budget
                target = req.computed + n
                nb = (target - req.slots + bs - 1) // bs if target > req.slots else 0
                if nb > self.free_blocks:
                    if req.slots and not running and not reqs:
                        # Requests holding reloaded KV fill the device and nothing runs to free a block:
                        # give this one's blocks back (its host copy stays) instead of stalling forever.
                        heapq.heappop(heap)
                        self.n_waiting -= 1
                        self._free_device(req)
                        self._push_waiting(req)
                        continue
                    break
                heapq.heappop(heap)
                self.n_waiting -= 1
                self._take(nb)
                req.slots += nb * bs
                if req.high > req.computed:
                    self.counters.recomputed_tokens += req.high - req.computed
                req.status = RUNNING
                running.append(req)
                if req.host:
                    self.lru[req.id] = req
                reqs.append(req)
                ns.append(n)
                budget -= n
                sched += n
                if need == 1:
                    decode += 1
                    attended += req.num_tokens
                else:
                    prefill += n

        if not reqs:
            return None
        stall = self.stall_until - now if self.stall_until > now else 0.0
        if self.preempt_stall:
            stall += self.preempt_stall
            self.preempt_stall = 0.0
        duration = self.profile.step_time(sched, attended) + stall
        step = Step(now, duration, reqs, ns, sched, prefill, decode, attended, stall)
        self._inflight = step
        return step

    def complete_step(self, step: Step, now: float) -> list[Emitted]:
        """Apply a step's results at ``now`` (normally ``step.start + step.duration``)."""
        if step is not self._inflight:
            raise ValueError("not the step in flight")
        self._inflight = None
        self.steps += 1
        emitted: list[Emitted] = []
        finished = False
        wt = self.write_through
        wt_budget = step.duration * self.d2h_tokens_per_s if wt else 0.0
        chunk = self.host_chunk
        host_free = self.host_cap - self.host_used
        lru = self.lru
        for req, n in zip(step.reqs, step.ns):
            c = req.computed + n
            req.computed = c
            if c > req.high:
                req.high = c
            if c == req.num_tokens:
                out = req.output + 1
                req.output = out
                req.num_tokens = c + 1
                if out >= req.limit:
                    emitted.append(Emitted(req.id, out - 1, "length"))
                    host_free += req.host
                    self._release(req)
                    finished = True
                    continue
                emitted.append(Emitted(req.id, out - 1, None))
            # write-through: KV produced in a step is copied during it, within the d2h bandwidth, whole chunks
            full = c - c % chunk
            if wt_budget >= 1.0 and host_free > 0 and req.host < full:
                d = full - req.host
                if d > wt_budget:
                    d = int(wt_budget)
                if d > host_free:
                    d = host_free
                req.host += d
                host_free -= d
                wt_budget -= d
                if req.id in lru:
                    lru.move_to_end(req.id)
                else:
                    lru[req.id] = req
        self.host_used = self.host_cap - host_free if wt else 0
        if finished:
            self.running = [r for r in self.running if r.status is RUNNING]
        # prefill's share of the step: its tokens' part of the token-proportional compute time (the fixed
        # base_s and any flush stall are paid by the step whether or not it prefills)
        pf = step.prefill_tokens
        pdur = (step.duration - self.profile.base_s - step.stall_s) * pf / step.scheduled_tokens if pf else 0.0
        self.window.add(step.duration, len(emitted), pf, pdur)
        return emitted

    # ------------------------------------------------------------------ control

    def command(self, op: str, req_id: str, now: float, priority: Any = None) -> dict[str, Any]:
        """Apply one control command (docs/engine-control-api.md) and return its result object."""
        if self._inflight is not None:
            raise StepInFlight("commands apply at step boundaries")
        if op not in OPS:
            return _err(req_id, op, "invalid_command", f"unknown op {op!r}")
        if op == "priority" and (isinstance(priority, bool) or not isinstance(priority, int)):
            return _err(req_id, op, "invalid_command", "'priority' must be an integer")
        req = self.reqs.get(req_id)
        if req is None:
            return _err(req_id, op, "not_found", f"unknown request id '{req_id}'")
        if op == "preempt":
            self._preempt(req, now)
        elif op == "resume":
            self._resume(req, now)
        elif op == "prefetch":
            self._prefetch(req, now)
        elif op == "priority":
            self._set_priority(req, priority)
        else:
            self._abort(req)
            return {"id": req_id, "op": op, "ok": True, "status": "aborted"}
        return {"id": req_id, "op": op, "ok": True, "status": req.status}

    def abort(self, req_id: str) -> bool:
        """Finish a request now and free its KV (client disconnect or abort). False if unknown."""
        if self._inflight is not None:
            raise StepInFlight("aborts apply at step boundaries")
        req = self.reqs.get(req_id)
        if req is None:
            return False
        self._abort(req)
        return True

    def _abort(self, req: _Req) -> None:
        st = req.status
        if st is RUNNING:
            self.running.remove(req)
        elif st is WAITING:
            self.n_waiting -= 1
        elif st is LOADING:
            self._drop_load(req)
        self.counters.aborts += 1
        self._release(req)

    def _preempt(self, req: _Req, now: float) -> None:
        st = req.status
        if st is HELD:
            return
        if st is RUNNING:
            self.running.remove(req)
            self._flush(req, now)
            self.preempt_stall += self.profile.preempt_s
        elif st is WAITING:
            req.qver += 1
            self.n_waiting -= 1
        elif st is LOADING:
            self._drop_load(req)
        self._free_device(req, cache=st is RUNNING or st is WAITING)
        self.lru.pop(req.id, None)  # held copies are pinned
        req.status = HELD
        req.started = True
        req.preemptions += 1
        self.counters.preemptions += 1

    def _resume(self, req: _Req, now: float) -> None:
        st = req.status
        if st is HELD:
            self.counters.resumes += 1
            if (req.host > 0 and not self._cache_covers_host(req) and self._prefer_load(req, now)
                    and -(-req.host // self.bs) <= self.free_blocks):
                self._start_load(req, now, RUNNING)  # else: the prefix cache, or recomputation, in the queue
            else:
                self._push_waiting(req)
        elif st is PARKED:
            self.counters.resumes += 1
            self._push_waiting(req)
        elif st is LOADING and req.after_load is not RUNNING:
            # prefetched and still loading: run as soon as the load ends
            self.counters.resumes += 1
            req.after_load = RUNNING

    def _prefetch(self, req: _Req, now: float) -> None:
        if req.status is not HELD:
            return
        self.counters.prefetches += 1
        if req.host == 0:
            req.status = PARKED
        elif -(-req.host // self.bs) <= self.free_blocks:
            self._start_load(req, now, PARKED)
        else:
            req.status = LOADING
            req.after_load = PARKED
            self.load_pending.append(req)

    def _set_priority(self, req: _Req, priority: int) -> None:
        req.priority = priority
        if req.status is WAITING:
            req.qver += 1
            heapq.heappush(self.waiting, (_queue_key(req, self.loaded_first), req.seq, req.qver, req))

    # ------------------------------------------------------------------ KV helpers

    def _push_waiting(self, req: _Req) -> None:
        req.status = WAITING
        req.qver += 1
        self.n_waiting += 1
        heapq.heappush(self.waiting, (_queue_key(req, self.loaded_first), req.seq, req.qver, req))

    def _free_device(self, req: _Req, cache: bool = False) -> None:
        """Free a request's device KV; with ``cache`` (a preemption) and the prefix cache on, its full
        computed blocks keep their KV until another request needs the blocks."""
        nb = req.slots // self.bs
        k = min(req.computed // self.bs, nb) if cache and self.pcache and nb else 0
        if k:
            self._drop_cache(req)
        self._give(nb - k)  # vLLM queues a request's blocks tail first: the uncomputed tail goes first
        if k:
            entry = [req, k]
            self.free_queue.append(entry)
            self.free_blocks += k
            req.cached = k
            req.centry = entry
            self.cached_blocks += k
        req.slots = 0
        req.computed = 0

    def _give(self, nb: int) -> None:
        if nb > 0:
            self.free_blocks += nb
            if self.pcache:
                self.free_queue.append([None, nb])

    def _take(self, nb: int) -> None:
        """Allocate ``nb`` free blocks from the front of the free queue; a cached request loses its prefix
        from the tail (its tail blocks were queued first)."""
        self.free_blocks -= nb
        if not self.pcache:
            return
        q = self.free_queue
        while nb > 0:
            entry = q[0]
            k = entry[1] if entry[1] < nb else nb
            entry[1] -= k
            nb -= k
            owner = entry[0]
            if owner is not None:
                owner.cached -= k
                self.cached_blocks -= k
                if owner.cached == 0:
                    owner.centry = None
            if entry[1] == 0:
                q.popleft()

    def _reclaim(self, req: _Req) -> None:
        """A re-admitted request takes its cached prefix back (no load, no recomputation)."""
        k = req.cached
        entry = req.centry
        assert entry is not None
        entry[1] = 0  # out of the free queue (the empty segment is dropped when the front reaches it)
        entry[0] = None
        req.centry = None
        req.cached = 0
        self.cached_blocks -= k
        self.free_blocks -= k
        req.slots = k * self.bs
        req.computed = k * self.bs

    def _cache_covers_host(self, req: _Req) -> bool:
        """The device's prefix cache still holds the request's host copy (up to the last, partial block)."""
        return req.cached > 0 and req.cached * self.bs + self.bs >= req.host

    def _drop_cache(self, req: _Req) -> None:
        """Forget a request's cached prefix (its blocks stay free, where they are in the queue)."""
        if req.cached:
            assert req.centry is not None
            req.centry[0] = None
            req.centry = None
            self.cached_blocks -= req.cached
            req.cached = 0

    def _release(self, req: _Req) -> None:
        """Free everything a finished request holds and forget it."""
        self._drop_cache(req)
        self._give(req.slots // self.bs)
        req.slots = 0
        self.host_used -= req.host
        req.host = 0
        self.lru.pop(req.id, None)
        req.status = FINISHED
        req.qver += 1
        del self.reqs[req.id]

    def _flush(self, req: _Req, now: float) -> None:
        """Synchronously copy the unsynced tail of a request's KV to host (it is being preempted): its full chunks;
        the unfilled last one is recomputed on resume."""
        if not self.write_through:
            return
        tail = req.computed - req.computed % self.host_chunk - req.host
        if tail <= 0:
            return
        free = self.host_cap - self.host_used
        if free < tail:
            self.lru.pop(req.id, None)
            while free < tail and self.lru:
                _, victim = self.lru.popitem(last=False)
                free += victim.host
                self.host_used -= victim.host
                victim.host = 0
        d = tail if tail <= free else free
        if d <= 0:
            return
        req.host += d
        self.host_used += d
        start = self.stall_until if self.stall_until > now else now
        self.stall_until = start + self.profile.store_time(d)
        req.flush_done = self.stall_until

    def _engine_preempt(self, req: _Req, now: float) -> None:
        """KV exhausted: the engine preempts a running request (already removed from self.running)."""
        self.counters.preemptions += 1
        req.preemptions += 1
        self.lru.pop(req.id, None)
        if self.engine_preempt == "offload":
            self._flush(req, now)
        else:
            self.host_used -= req.host
            req.host = 0
        if self.cascade:  # the blocks free only once the step in flight is done
            self.frozen += req.slots // self.bs
        self.preempt_stall += self.profile.preempt_s
        self._free_device(req, cache=True)
        req.started = True
        self._push_waiting(req)

    def _prefer_load(self, req: _Req, now: float, have: int = 0) -> bool:
        """Reload the host copy (beyond ``have`` tokens already on the device) if that is quicker than
        recomputing the same tokens in the batch."""
        backlog = self.h2d_free_at - now if self.h2d_free_at > now else 0.0
        n = req.host - have
        return backlog + self.profile.load_time(n) <= self.profile.per_token_s * n

    def _start_load(self, req: _Req, now: float, then: str) -> None:
        """Load the host copy; blocks the request already holds (a reclaimed prefix) are not copied."""
        self._drop_cache(req)
        n = req.host
        have = req.slots
        nb = -(-n // self.bs) - have // self.bs
        self._take(nb)
        req.slots = have + nb * self.bs
        req.computed = 0
        start = max(now, self.h2d_free_at, req.flush_done)
        req.load_finish = start + self.profile.load_time(n - have)
        req.load_tokens = n
        req.load_base = have
        self.h2d_free_at = req.load_finish
        req.after_load = then
        req.status = LOADING
        self.loads.append(req)

    def _drop_load(self, req: _Req) -> None:
        try:
            self.loads.remove(req)
        except ValueError:
            self.load_pending.remove(req)

    def _poll_loads(self, now: float) -> None:
        loads = self.loads
        while loads and loads[0].load_finish <= now:
            req = loads.popleft()
            req.computed = req.load_tokens
            self.counters.host_restored_tokens += req.load_tokens - req.load_base
            if req.after_load is RUNNING:
                self._push_waiting(req)
            else:
                req.status = PARKED
        pending = self.load_pending
        while pending and -(-pending[0].host // self.bs) <= self.free_blocks:
            req = pending.popleft()
            self._start_load(req, now, req.after_load)

    # ------------------------------------------------------------------ state

    def state(self, now: float) -> dict[str, Any]:
        """The contract's GET /control/v1/state body."""
        p = self.profile
        counts = {WAITING: 0, RUNNING: 0, LOADING: 0, HELD: 0, PARKED: 0}
        used = 0
        requests = []
        off = self.clock_offset
        for r in self.reqs.values():
            counts[r.status] += 1
            used += r.slots
            requests.append(
                {
                    "id": r.id,
                    "status": r.status,
                    "priority": r.priority,
                    "arrival_time": r.arrival + off,
                    "prompt_tokens": r.prompt,
                    "output_tokens": r.output,
                    "computed_tokens": r.computed,
                    "max_tokens": r.max_tokens,
                    "kv_device_tokens": r.slots,
                    "kv_host_tokens": r.host,
                    "preemptions": r.preemptions,
                }
            )
        w = self.window
        c = self.counters
        return {
            "engine": {
                "name": p.name,
                "kind": "simulated",
                "block_size": p.block_size,
                "max_num_seqs": p.max_num_seqs,
                "kv_bytes_per_token": p.kv_bytes_per_token,
                "kv_device_capacity_tokens": self.total_blocks * self.bs,
                "kv_device_used_tokens": used,
                "kv_host_capacity_tokens": self.host_cap,
                "kv_host_used_tokens": self.host_used,
                "num_running": counts[RUNNING],
                "num_waiting": counts[WAITING],
                "num_held": counts[HELD],
                "num_loading": counts[LOADING],
                "num_parked": counts[PARKED],
                "step_time_s": w.dur / len(w.items) if w.items else None,
                "decode_step_time_s": w.decode_step,
                "decode_tokens_per_s": w.decode / w.dur if w.dur > 0 else None,
                "prefill_tokens_per_s": w.prefill_tokens_per_s(),
                "h2d_bytes_per_s": p.h2d_bytes_per_s,
                "d2h_bytes_per_s": p.d2h_bytes_per_s,
                "counters": {
                    "preemptions": c.preemptions,
                    "resumes": c.resumes,
                    "prefetches": c.prefetches,
                    "aborts": c.aborts,
                    "host_restored_tokens": c.host_restored_tokens,
                    "recomputed_tokens": c.recomputed_tokens,
                },
            },
            "requests": requests,
        }

    def read_state(self, now: float) -> dict[str, Any]:
        """state() as a control round reads it: with ``engine.state_s_per_held`` the round costs the engine
        that much per held or parked request, paid by the next step (the vLLM plugin serves the read and the
        commands after it on the scheduler thread, between steps; docs/sim-cost-model.md)."""
        per = self.profile.state_s_per_held
        if per > 0.0:
            n = sum(1 for r in self.reqs.values() if r.status is HELD or r.status is PARKED)
            self.preempt_stall += per * n
        return self.state(now)

    def request_state(self, req_id: str, now: float) -> dict[str, Any] | None:
        """One request object of state(), or None if unknown."""
        if req_id not in self.reqs:
            return None
        for r in self.state(now)["requests"]:
            if r["id"] == req_id:
                return r
        return None

    def check_invariants(self) -> None:
        """Assert the KV accounting is consistent (tests and debugging)."""
        assert self.free_blocks + sum(r.slots for r in self.reqs.values()) // self.bs == self.total_blocks
        assert self.cached_blocks == sum(r.cached for r in self.reqs.values()) <= self.free_blocks
        if self.pcache:
            assert sum(e[1] for e in self.free_queue) == self.free_blocks
        assert self.host_used == sum(r.host for r in self.reqs.values())
        assert 0 <= self.host_used <= max(self.host_cap, 0)
        assert self.n_waiting == sum(1 for r in self.reqs.values() if r.status is WAITING)
        assert {r.id for r in self.running} == {r.id for r in self.reqs.values() if r.status is RUNNING}
        for r in self.reqs.values():
            assert r.computed <= r.slots or r.status is LOADING, r.id
            assert r.host <= max(r.high, r.computed), r.id
            if r.status is HELD:
                assert r.slots == 0 and r.computed == 0, r.id


def _err(req_id: str, op: str, code: str, message: str) -> dict[str, Any]:
    return {"id": req_id, "op": op, "ok": False, "error": {"code": code, "message": message}}
