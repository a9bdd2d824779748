"""``tokenflow``: buffer-aware preemptive scheduling (TokenFlow, EuroSys '26, section 4).

Each tick, under stress only (a request waits in the engine, or one is paused by us):

1. Working set. At most ``W = overcommit * M / beta`` requests are admitted (running plus paused on
   the host), ``beta`` being the mean lifetime KV footprint; when fewer run, ``W`` shrinks toward the
   running count by ``shrink_rate`` (paper Eq. 4-5). Where the engine has a host tier, admitted contexts
   must also fit device plus host KV, and the engine must be able to feed the admitted readers (a
   look-ahead over 2-80 s: what their buffers hold counts): under overload new requests enter as fast as
   capacity frees up, not all at once and not only when whole answers end. New requests past that are
   kept out of the engine (held, no KV).
2. Buffer balancing. Every admitted request gets a slack: seconds until it must be running so that its
   client never stalls, i.e. ``buffer / rate - mu * (evict + reload-or-recompute + tick)``. A request that
   has not started has an empty buffer and a slack that falls below 0 once it has waited
   ``first_token_grace_s`` (``first_token_aging`` seconds per second: its wait counts like a stall), which
   puts it ahead of every request that can still wait and, after about a switch margin, of started ones
   about to run dry; that is what cuts TTFT, the tail included, under overload. Requests are taken in
   slack order while batch slots and device KV (whole blocks, one tick of growth ahead) last: the engine
   never has to preempt on its own. A running request with negative slack is paused only for a more
   urgent one (the safety rule, made relative: under overload someone stalls, and it is spread over the
   started streams). A local swap pass then keeps a running request instead of a paused one whose slack
   is barely lower (hysteresis: a switch costs I/O and disturbs the batch).
3. Reload or recompute. Switch cost per request is the cheaper of copying its host KV back
   (measured host-to-device bandwidth plus the part to recompute) and recomputing it all (measured
   prefill rate); the engine makes the same choice on resume. A runner whose unsynced tail the host
   tier has no room for is priced at recomputation.
4. Prefetch. A paused request whose buffer will run dry within ``mu * (load + prefetch_ticks * tick)``
   is prefetched while device memory is free, so its KV is back before its buffer empties.
5. Overload. When the admitted requests' declared rates exceed the estimated decode capacity, the same
   rules hold (``info.mode`` says ``overload`` for logs): there is no first-come-first-served fallback,
   which made the last requests of a burst wait for whole answers as on a plain engine.

Pure: no I/O, no clock. State kept between ticks: the last capacity estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

from .knobs import TokenFlowKnobs
from .types import Decision, EngineStatus, Snapshot, StreamView

_RUNNING = EngineStatus.RUNNING
_WAITING = EngineStatus.WAITING
_LOADING = EngineStatus.LOADING
_HELD = EngineStatus.HELD
_PARKED = EngineStatus.PARKED

# Engine priorities the policy uses (lower = more important, as in vLLM).
PRIORITY_ADMITTED = 0
PRIORITY_DEFERRED = 1

_MUST_RUN = -math.inf

# Horizons (seconds) over which admission checks that the engine keeps up with the admitted readers (four:
# `_slack_pass` buckets streams by them with an unrolled comparison).
_HORIZONS_S = (2.0, 8.0, 24.0, 80.0)


@dataclass(slots=True)
class TickInfo:
    """What the last tick saw and chose; for logs, metrics and tests."""

    mode: str = "idle"  # idle | balance | overload
    working_set: int = 0
    admitted: int = 0
    capacity_tps: float = math.inf
    demand_tps: float = 0.0
    selected: int = 0
    held_new: int = 0  # new requests admission left out this tick (held out of the engine)
    # What stopped admission at the first of them: "working_set" (Step 1's count), "kv" (device plus host KV) or
    # "capacity" (the engine cannot feed one more reader over a look-ahead horizon); "" when none was left out.
    admit_limit: str = ""
    deferred_new: int = 0  # new requests admitted but not chosen for the device this tick (no slot, or less urgent)
    admit_capacity_tps: float = math.inf  # what admission checked the readers against (the recent steps, <= capacity)
    prefill_tps: float = math.inf  # the prompt rate admission priced a newcomer's prefill at (measured, or the default)

    def as_log(self) -> dict[str, float | int | str]:
        """The tick for a log line (JSON-able: an unknown capacity is -1)."""
        def rate(v: float) -> float:
            return round(v, 1) if v < math.inf else -1.0

        return {"mode": self.mode, "working_set": self.working_set, "admitted": self.admitted,
                "selected": self.selected, "held_new": self.held_new, "admit_limit": self.admit_limit,
                "deferred_new": self.deferred_new, "capacity_tps": rate(self.capacity_tps),
                "admit_capacity_tps": rate(self.admit_capacity_tps), "demand_tps": round(self.demand_tps, 1),
                "prefill_tps": rate(self.prefill_tps)}


@dataclass(frozen=True, slots=True)
class _Costs:
    """What moving a request costs on this engine, per token (measured, or the knobs' defaults until then)."""

    tick: float  # the control loop's interval
    mu: float  # conservativeness
    step: float  # seconds per engine step
    load_s: float  # host -> device copy
    evict_s: float  # device -> host copy
    rec_s: float  # recomputation (prefill)
    block: int  # KV block size: the engine allocates whole blocks
    host_free: int  # host KV tokens not referenced (a hold that does not fit is recomputed)

    @classmethod
    def of(cls, snapshot: Snapshot, k: TokenFlowKnobs) -> _Costs:
        eng = snapshot.engine
        bpt = eng.kv_bytes_per_token
        return cls(
            tick=snapshot.tick_interval_s,
            mu=k.conservativeness,
            step=eng.step_time_s or k.default_step_time_s,
            load_s=bpt / (eng.h2d_bytes_per_s or k.default_bytes_per_s),
            evict_s=bpt / (eng.d2h_bytes_per_s or k.default_bytes_per_s),
            rec_s=1.0 / (eng.prefill_tokens_per_s or k.default_prefill_tokens_per_s),
            block=max(1, eng.block_size),
            host_free=eng.kv_host_capacity_tokens - eng.kv_host_used_tokens,
        )


@dataclass(slots=True)
class _Tick:
    """One pass over the streams: per stream (by snapshot index) its slack key, footprint and kind, and the
    working-set bookkeeping of the whole engine."""

    keys: list[float]  # slack: seconds until it must run (lower = more urgent; _MUST_RUN = cannot pause)
    tte: list[float]  # seconds its buffer lasts (started requests; 0 for the others)
    foot: list[int]  # device KV tokens it needs for the next tick
    # 0 running, 1 paused after starting (held / waiting), 2 other. Flags per stream are lists, not bytearrays,
    # here and in the passes below: CPython 3.11 specializes list subscripts only (half the cost per access).
    kind: list[int]
    new_idx: list[int]  # not started, not running: new requests, admitted or not
    order: list[int]  # candidates for the device: all but new requests not yet admitted
    n_running: int
    prefilling: bool  # a request is mid-prefill (its steps are no decode-speed sample)
    backlog: float  # seconds of host-to-device copies in flight (progress is not reported: whole copies)
    admitted: int
    demand: float  # tokens/s the admitted requests' readers want
    beta_sum: float  # lifetime KV footprints, summed (their mean is the paper's beta)
    # Per admission horizon h_x (bucket x: streams whose buffer runs dry before h_x, not before h_{x-1}): the
    # sum of their rates and of their buffers; the same for streams whose reader reaches the end of what they
    # still have to produce before h_x (buffer + remaining tokens). Their reading wants r * h - buffer
    # tokens by h, capped at what they still produce: what `_admit_new` checks against the engine.
    dry_rate: list[float]
    dry_buf: list[float]
    end_rate: list[float]
    end_tokens: list[float]


def _slack_pass(streams: tuple[StreamView, ...], c: _Costs, now: float, aging: float, grace: float) -> _Tick:
    """Slack key, footprint and working-set bookkeeping of every stream, in one pass (the hot loop: no calls,
    locals only)."""
    n = len(streams)
    keys = [0.0] * n
    ttes = [0.0] * n
    foot = [0] * n
    kind = [0] * n
    new_idx: list[int] = []
    order: list[int] = []
    n_running = 0  # counted here: list.count costs 7 us a thousand
    prefilling = False
    backlog = 0.0
    demand = 0.0
    beta_sum = 0.0
    big = 1 << 40
    tick, mu, step, load_s, evict_s, rec_s = c.tick, c.mu, c.step, c.load_s, c.evict_s, c.rec_s
    g_int = int(tick / step) + 1  # tokens a running request adds in one tick (and the step in flight)
    bs, bs1 = c.block, c.block - 1
    g_up = g_int + bs1  # (rounding up to whole blocks folded in: one int operation less per stream)
    host_free = c.host_free
    back_run = load_s if load_s < rec_s else rec_s  # per token, once its KV is all on the host
    mu_tick = mu * tick
    host_gap = rec_s - load_s  # a host-resident token reloads instead of being recomputed (when cheaper)
    host_gap = host_gap if host_gap > 0 else 0.0
    inf = math.inf
    h0, h1, h2, h_last = _HORIZONS_S
    # per-horizon bucket sums in locals (list subscripts cost more in this loop)
    dr0 = dr1 = dr2 = dr3 = db0 = db1 = db2 = db3 = 0.0
    er0 = er1 = er2 = er3 = et0 = et1 = et2 = et3 = 0.0
    for i, s in enumerate(streams):
        st = s.status  # kind is set below per status (0, running, by default)
        gen = s.generated_tokens
        prompt = s.prompt_tokens
        ctx = prompt + gen
        mt = s.max_tokens
        if mt is None:
            rem = big
            beta_sum += ctx
        else:
            rem = mt - gen
            beta_sum += prompt + 0.5 * mt
        # its context and one tick of growth (at most what it still produces), in whole blocks: what the engine
        # will allocate
        foot[i] = (ctx + (rem + bs1 if rem < g_int else g_up)) // bs * bs
        if s.first_token_time is None:
            if st is _RUNNING:
                keys[i] = _MUST_RUN  # mid-prefill: pausing it wastes the prompt work
                n_running += 1
                prefilling = True
                demand += s.rate
                order.append(i)
            else:
                waited = now - s.arrival_time - grace
                keys[i] = -aging * waited if waited > 0.0 else 0.0
                kind[i] = 2
                new_idx.append(i)
            continue
        order.append(i)
        r = s.rate
        demand += r
        b = s.buffer_tokens
        tte = b / r if r > 0.0 else inf  # (floats compared with a float: an int 0 takes CPython's slow path)
        ttes[i] = tte
        if tte < h_last:
            if tte < h0:
                dr0 += r
                db0 += b
            elif tte < h1:
                dr1 += r
                db1 += b
            elif tte < h2:
                dr2 += r
                db2 += b
            else:
                dr3 += r
                db3 += b
            end = b + rem  # tokens read by the end of what it still produces
            if end < h_last * r:
                e = end / r
                if e < h0:
                    er0 += r
                    et0 += end
                elif e < h1:
                    er1 += r
                    et1 += end
                elif e < h2:
                    er2 += r
                    et2 += end
                else:
                    er3 += r
                    et3 += end
        if st is _RUNNING:
            n_running += 1
            if rem * step <= tick:
                keys[i] = _MUST_RUN  # finishes within the tick: pausing it only costs I/O
                continue
            tail = s.kv_device_tokens - s.kv_host_tokens
            # When the host tier cannot take its tail, a pause means recomputing it all.
            back = ctx * rec_s if tail > host_free else (tail * evict_s if tail > 0 else 0.0) + ctx * back_run
            keys[i] = tte - mu * back - mu_tick
        elif st is _PARKED:
            kind[i] = 2
            keys[i] = tte - mu_tick
        elif st is _LOADING:
            kind[i] = 2
            miss = ctx - s.kv_device_tokens
            keys[i] = tte - mu * (miss * load_s if miss > 0 else 0.0) - mu_tick
            backlog += s.kv_host_tokens * load_s
        else:  # held, or resumed and waiting for admission: reload what the host has if cheaper
            kind[i] = 1
            host = s.kv_host_tokens
            keys[i] = tte - mu * (ctx * rec_s - host * host_gap) - mu_tick
    # every request in `order` so far is admitted: the running (prefill included) and the started ones
    return _Tick(keys, ttes, foot, kind, new_idx, order, n_running, prefilling, backlog, len(order), demand, beta_sum,
                 [dr0, dr1, dr2, dr3], [db0, db1, db2, db3], [er0, er1, er2, er3], [et0, et1, et2, et3])


class TokenFlowPolicy:
    name = "tokenflow"

    def __init__(self, knobs: TokenFlowKnobs | None = None, **overrides: Any) -> None:
        if knobs is None:
            knobs = TokenFlowKnobs.from_mapping(overrides)
        elif overrides:
            raise TypeError("pass either knobs or keyword overrides, not both")
        self.knobs = knobs
        self._per_seq_tps: float | None = None  # decaying max of the decode-only per-sequence rate
        self._cap_time: float | None = None
        self.info = TickInfo()

    def tick_report(self) -> dict[str, float | int | str]:
        return self.info.as_log()

    def forget(self, stream_id: str) -> None:
        return None  # no per-stream state

    # ------------------------------------------------------------------ helpers
    def _capacity(self, snap: Snapshot, now: float, beta: float, prefilling: bool) -> float:
        """Decode tokens/s the engine sustains (Eq. 6's Gamma): a decaying maximum of the per-sequence
        decode speed seen in steps without new prompts, times the batch that fits in device memory.

        Steps that carry prompt work (new arrivals, recomputation) are slower than decode steps; the
        decaying maximum keeps one prefill-heavy window from reading as a capacity collapse, while a
        lasting slow-down (longer contexts) still lowers the estimate within a few half-lives.
        """
        eng = snap.engine
        est = self._per_seq_tps
        if est is not None and self._cap_time is not None and now > self._cap_time:
            est *= 0.5 ** ((now - self._cap_time) / self.knobs.capacity_halflife_s)
        step = eng.decode_step_time_s or (None if prefilling else eng.step_time_s)
        if step:
            obs = 1.0 / step
            est = obs if est is None or obs > est else est
        self._per_seq_tps, self._cap_time = est, now
        if est is None:
            return math.inf
        fit = min(float(eng.max_num_seqs), self.knobs.memory_target * eng.kv_device_capacity_tokens / max(beta, 1.0))
        return est * max(fit, 1.0)

    def _admit_capacity(self, snap: Snapshot, gamma: float, beta_sum: float, prefilling: bool) -> float:
        """Decode tokens/s to admit against: the engine's recent steps as they are (a CPU shared with other
        work, longer contexts), not the best seen, so the admitted readers stay fed; never above Gamma.
        While prompts are being computed the steps are no decode sample (they would stall admission in the
        middle of a burst's prefill): Gamma then."""
        eng = snap.engine
        if prefilling and gamma < math.inf:
            return gamma
        # No decode sample yet (a fresh engine at a burst's start): the steps as measured, or the knob's default,
        # rather than no limit at all.
        step = eng.decode_step_time_s or eng.step_time_s or self.knobs.default_step_time_s
        beta = beta_sum / max(1, len(snap.streams))
        fit = min(float(eng.max_num_seqs), self.knobs.memory_target * eng.kv_device_capacity_tokens / max(beta, 1.0))
        now_cap = max(fit, 1.0) / step
        return now_cap if now_cap < gamma else gamma

    # ------------------------------------------------------------------ the tick
    def decide(self, snapshot: Snapshot, now: float) -> list[Decision]:
        # A client that stopped reading needs no engine until it reads again, stress or not: pause it
        # (its KV stays on the host) and leave it out of the balancing below, so it is never resumed to
        # fill free slots. When it drains again it is an ordinary paused request.
        stalled: list[Decision] = []
        if [s for s in snapshot.streams if s.stalled]:  # (a third of the cost of any() over a generator)
            keep = []
            for s in snapshot.streams:
                if s.stalled and s.first_token_time is not None:
                    if s.status is not _HELD:
                        stalled.append(Decision("preempt", s.id, None, "stalled"))
                else:
                    keep.append(s)
            snapshot = replace(snapshot, streams=tuple(keep))
        return stalled + self._balance(snapshot, now)

    def _balance(self, snapshot: Snapshot, now: float) -> list[Decision]:
        """Steps 1-4 of the module docstring, under stress only."""
        self.info = TickInfo()
        if all(s.status is _RUNNING for s in snapshot.streams):
            return []  # no stress: the engine already serves everyone
        costs = _Costs.of(snapshot, self.knobs)
        k = self.knobs
        tick = _slack_pass(snapshot.streams, costs, now, k.first_token_aging, k.first_token_grace_s)
        w_sched, gamma = self._working_set(snapshot, tick, now)
        self.info.mode = "overload" if tick.demand > gamma else "balance"
        admit_cap = self._admit_capacity(snapshot, gamma, tick.beta_sum, tick.prefilling)
        self.info.admit_capacity_tps = admit_cap
        admit_new = self._admit_new(snapshot, tick, w_sched, admit_cap)
        tick.order.extend(admit_new)
        tick.order.sort(key=tick.keys.__getitem__)  # stable: ties keep snapshot order (the gateway's arrival order)
        selected, reload, mem, backlog, out, inc = self._fill(snapshot, tick, costs)
        self.info.deferred_new = sum(1 for j in admit_new if not selected[j])
        mem = self._swap(tick, selected, mem, out, inc)
        decisions = self._decisions(snapshot, tick, costs, selected, reload, mem, backlog)
        # admission takes a prefix of the new requests (oldest first, up to the first that does not fit)
        self._gate(snapshot.streams, tick.new_idx[len(admit_new):], decisions)
        return decisions

    def _working_set(self, snapshot: Snapshot, tick: _Tick, now: float) -> tuple[int, float]:
        """Step 1 (Eq. 4-5): how many requests may be admitted; and the decode capacity (Eq. 6), reported
        beside the admitted demand. Returns the working set and the capacity."""
        k = self.knobs
        beta = tick.beta_sum / len(snapshot.streams)
        cap_tokens = snapshot.engine.kv_device_capacity_tokens
        w_static = int(k.overcommit * cap_tokens / max(beta, 1.0))
        w_sched = w_static
        if tick.n_running < w_static:
            w_sched = int(w_static - k.shrink_rate * (w_static - tick.n_running))
        # Shrinking limits over-commitment only: what fits on the device is always admissible (else a
        # shrink rate of 1 with nothing running would admit nothing, ever).
        w_sched = max(w_sched, int(k.memory_target * cap_tokens / max(beta, 1.0)), 1)
        gamma = self._capacity(snapshot, now, beta, tick.prefilling)
        info = self.info
        info.working_set, info.admitted, info.capacity_tps, info.demand_tps = w_sched, tick.admitted, gamma, tick.demand
        return w_sched, gamma

    def _admit_new(self, snapshot: Snapshot, tick: _Tick, w_sched: int, capacity: float) -> list[int]:
        """New requests admitted, oldest first, while (a) the working set allows; (b) where the engine has a
        host tier, every admitted context fits device plus host KV (a hold that fits nowhere would be
        recomputed); and (c) the admitted streams stay feedable: for each horizon h in `_HORIZONS_S`, the
        tokens their readers will want within h beyond what their buffers hold (capped by what each still has
        to produce), plus the newcomer's first h seconds of reading and its prompt's prefill, fit in what the
        engine makes in h (``admit_utilization`` of ``capacity``), less ``stall_budget_s`` of each one's reading
        (the small stalls the policy may spread to start new requests sooner). New requests thus enter as fast as the
        engine can carry them: right away while buffers are deep or the engine has room, paced at the rate
        capacity frees up under overload, instead of all at once (every reader then stalls in turn) or only
        when whole answers end (first-come-first-served). One not admitted stays out of the engine's queue
        (see `_gate`)."""
        streams = snapshot.streams
        new_idx = tick.new_idx
        if not new_idx:
            return []
        new_idx.sort(key=lambda j: streams[j].arrival_time)
        room = w_sched - tick.admitted
        eng = snapshot.engine
        k = self.knobs
        hs = _HORIZONS_S
        n_h = len(hs)
        big = float(1 << 40)
        budget = k.stall_budget_s
        # Tokens the admitted readers want within each horizon beyond their buffers, capped by what each still
        # has to produce (a fluid earliest-deadline bound), less the stall budget of each; and their KV.
        need = [0.0] * n_h
        r_dry = b_dry = r_end = t_end = 0.0
        for x in range(n_h):
            r_dry += tick.dry_rate[x]
            b_dry += tick.dry_buf[x]
            r_end += tick.end_rate[x]
            t_end += tick.end_tokens[x]
            h = hs[x]
            need[x] = (r_dry * h - b_dry) - (r_end * h - t_end) - budget * tick.demand
        kv_room = math.inf
        if eng.kv_host_capacity_tokens > 0:
            # what the order holds (so far: every request but the new ones), summed in C
            held = sum(tick.foot) - sum(map(tick.foot.__getitem__, new_idx))
            kv_room = k.memory_target * eng.kv_device_capacity_tokens + eng.kv_host_capacity_tokens - held
        u = k.admit_utilization * capacity
        # What each horizon can still take, in locals: the four horizons are unrolled below, as in `_slack_pass`
        # (a loop over them per newcomer cost as much as the rest of admission).
        m0, m1, m2, m3 = [u * hs[x] - need[x] for x in range(n_h)]
        h0, h1, h2, h3 = hs
        prefill_tps = eng.prefill_tokens_per_s or k.default_prefill_tokens_per_s
        self.info.prefill_tps = prefill_tps
        rec_s = 1.0 / prefill_tps
        admit_new: list[int] = []
        force = tick.admitted == 0  # nothing admitted: one request always goes (an estimate too low must not stop all)
        limit = ""
        for j in new_idx:
            s = streams[j]
            if room <= 0:
                limit = "working_set"
                break
            mt = s.max_tokens
            out = big if mt is None else float(mt)
            kv = s.prompt_tokens + (0 if mt is None else mt)
            if kv > kv_room:
                limit = "kv"
                break  # arrival order: later ones wait behind this one
            r = s.rate
            # its prompt, in decode tokens the engine forgoes, less the stall it may absorb itself
            base = s.prompt_tokens * rec_s * capacity - budget * r
            # per horizon: its reading by then, capped at what it produces, plus that base
            a0, a1, a2, a3 = r * h0, r * h1, r * h2, r * h3
            a0 = (a0 if a0 < out else out) + base
            a1 = (a1 if a1 < out else out) + base
            a2 = (a2 if a2 < out else out) + base
            a3 = (a3 if a3 < out else out) + base
            if (a0 > m0 or a1 > m1 or a2 > m2 or a3 > m3) and not (force and not admit_new):
                limit = "capacity"
                break  # it does not fit (one forced is charged in full all the same)
            admit_new.append(j)
            room -= 1
            kv_room -= kv
            m0 -= a0
            m1 -= a1
            m2 -= a2
            m3 -= a3
        self.info.held_new = len(new_idx) - len(admit_new)
        self.info.admit_limit = limit
        return admit_new

    def _fill(self, snapshot: Snapshot, tick: _Tick, c: _Costs
              ) -> tuple[list[bool], list[bool], float, float, Iterable[int], list[int]]:
        """Step 2: batch slots and device memory, greedily in slack order, and Step 3's choice for each paused
        request brought back: reload its host copy or recompute it. Reloads share one host-to-device channel:
        a reload queued behind others is worth it while queueing + copy beats recomputing, or while the
        client's buffer covers the wait (a queued copy costs nobody else; a recomputation takes every running
        request's share of the batch). Recomputation is engine time: at most ``switch_budget`` of each tick
        goes to it (one request always may), the rest stay paused for a later tick. Without that bound an
        oversubscribed engine recomputes more than it decodes and every reader stalls (the simulator with the
        measured H200 profile: 10 M tokens recomputed for 0.8 M generated).
        Returns the chosen requests, which of them reload, the device memory left, the copy backlog and `_swap`'s
        candidates (collected here: a pass of their own over the order cost as much as the swap pass itself; the
        outgoing ones past the last chosen request as the swap asks for them, as it looks at a few only)."""
        streams = snapshot.streams
        keys, foot, kind, tte = tick.keys, tick.foot, tick.kind, tick.tte
        n = len(keys)
        selected = [False] * n  # (bools: a branch on one skips the truth test an int needs)
        reload = [False] * n
        slots = snapshot.engine.max_num_seqs
        mem = self.knobs.memory_target * snapshot.engine.kv_device_capacity_tokens
        backlog = tick.backlog
        load_s, rec_s = c.load_s, c.rec_s
        budget = self.knobs.switch_budget * c.tick
        spent = 0.0
        out: list[int] = []  # running, not chosen (in slack order)
        rest: Iterable[int] = ()  # the same past the last chosen request, lazily
        inc: list[int] = []  # paused after starting, chosen (in slack order)
        order = tick.order
        for pos, i in enumerate(order):
            f = foot[i]
            if slots > 0 and f <= mem:
                if kind[i] == 1 and streams[i].status is _HELD:
                    s = streams[i]
                    host = s.kv_host_tokens
                    ctx = s.prompt_tokens + s.generated_tokens
                    io = backlog + host * load_s
                    if host > 0 and (io + (ctx - host) * rec_s <= ctx * rec_s or io <= tte[i]):
                        work = (ctx - host) * rec_s if ctx > host else 0.0
                        if work > 0.0 and spent > 0.0 and spent + work > budget:
                            continue
                        reload[i] = True
                        backlog = io
                    else:
                        work = ctx * rec_s
                        if spent > 0.0 and spent + work > budget:
                            continue
                    spent += work
            elif keys[i] != _MUST_RUN:
                if slots <= 0:
                    # No slot left, and past the requests that must run (at -inf, they sort first; no key is NaN):
                    # nothing later is chosen. Most of the order under stress: its runners are all outgoing.
                    rest = (j for j in order[pos:] if kind[j] == 0)
                    break
                if kind[i] == 0:
                    out.append(i)
                continue
            # Chosen. A request with no room left is chosen all the same when it must run (mid-prefill or about
            # to finish), even if the engine must find the room itself. Any other runner left out above is paused
            # by us (its KV to the host) rather than left for the engine to preempt by recomputation when its KV
            # runs out.
            selected[i] = True
            slots -= 1
            mem -= f
            if kind[i] == 1:
                inc.append(i)
        inc.reverse()  # least urgent first
        self.info.selected = snapshot.engine.max_num_seqs - slots  # (swaps keep the count)
        return selected, reload, mem, backlog, chain(out, rest), inc

    def _swap(self, tick: _Tick, selected: list[bool], mem: float, out: Iterable[int], inc: list[int]) -> float:
        """Local swaps: keep a running request rather than switch to a paused one that is barely more urgent.
        Outgoing (``out``) = running, not chosen, most urgent first; incoming (``inc``) = paused after starting,
        chosen, least urgent first. Returns the device memory left."""
        keys, tte, foot = tick.keys, tick.tte, tick.foot
        tol = self.knobs.swap_tolerance_s
        b, n_inc = 0, len(inc)
        for o in out:
            if b == n_inc:
                break
            p = inc[b]
            if keys[p] <= 0.0 < keys[o]:
                break  # p must run now and o can wait
            if keys[p] <= 0.0 and keys[o] <= 0.0:
                # Both about to run dry (overload): the paused one's slack is lower by its own switch cost
                # alone, and swapping two empty streams every tick helps neither. Only buffers count: the
                # runner goes once it holds swap_tolerance_s more than the paused one (round robin with a
                # quantum, not a switch per tick).
                if tte[o] - tte[p] >= tol:
                    break
            elif keys[o] - keys[p] >= tol:
                break  # o is clearly less urgent
            # Otherwise a switch is not worth its I/O for less than swap_tolerance_s of urgency.
            if foot[o] - foot[p] <= mem:
                selected[o], selected[p] = True, False
                mem -= foot[o] - foot[p]
                b += 1
        return mem

    def _decisions(self, snapshot: Snapshot, tick: _Tick, c: _Costs, selected: list[bool], reload: list[bool],
                   mem: float, backlog: float) -> list[Decision]:
        """The commands that carry out the choice (``reload``: `_fill`'s Step 3 choice). Step 4: prefetch paused
        requests whose buffers will soon run dry, while the copy channel's queue and device memory allow."""
        streams, keys, foot = snapshot.streams, tick.keys, tick.foot
        load_s, rec_s, mu = c.load_s, c.rec_s, c.mu
        prefetch_window = mu * self.knobs.prefetch_ticks * c.tick
        relaxed = self.knobs.swap_tolerance_s
        decisions: list[Decision] = []
        for i in tick.order:
            s = streams[i]
            st = s.status
            if selected[i]:
                if st is _RUNNING:
                    # Mark comfortably buffered runners as the engine's first victims should it run out
                    # of KV blocks on its own between ticks.
                    want = PRIORITY_DEFERRED if keys[i] >= relaxed else PRIORITY_ADMITTED
                    if s.priority != want:
                        decisions.append(Decision("priority", s.id, want, "victim_order"))
                elif st is _HELD:
                    if s.priority != PRIORITY_ADMITTED:
                        decisions.append(Decision("priority", s.id, PRIORITY_ADMITTED, "admit"))
                    if reload[i]:
                        # prefetch always copies (resume may recompute when the channel is busy);
                        # resume right after makes it run as soon as the copy lands.
                        decisions.append(Decision("prefetch", s.id, None, "reload"))
                        decisions.append(Decision("resume", s.id, None, "urgent" if keys[i] < 0.0 else "fill"))
                    else:
                        decisions.append(Decision("resume", s.id, None, "recompute"))
                elif st is _PARKED:
                    decisions.append(Decision("resume", s.id, None, "urgent" if keys[i] < 0.0 else "fill"))
                elif st is _LOADING:
                    decisions.append(Decision("resume", s.id, None, "run_after_load"))
                continue
            if st is _HELD:  # the most common case under stress: tested first, and its cheapest tests first
                host = s.kv_host_tokens
                if host > 0:
                    io = backlog + host * load_s
                    if s.buffer_tokens <= s.rate * (mu * io + prefetch_window) and foot[i] <= mem:
                        ctx = s.prompt_tokens + s.generated_tokens
                        if io + (ctx - host) * rec_s < ctx * rec_s:  # the copy beats recomputing
                            mem -= foot[i]
                            backlog = io
                            decisions.append(Decision("prefetch", s.id, None, "prefetch"))
            elif st is _RUNNING:
                # "overload": it was about to run dry too, but a more urgent request needs its slot or blocks.
                decisions.append(Decision("preempt", s.id, None, "buffered" if keys[i] >= 0.0 else "overload"))
            elif st is _WAITING:
                decisions.append(Decision("preempt", s.id, None, "defer"))  # keep it out of the engine queue
            elif st is _PARKED or st is _LOADING:
                # Not chosen to run, yet holding (or about to hold) device blocks: it keeps them only
                # while they fit beside the chosen requests, most urgent first. Otherwise urgent requests
                # that are all paused could park the whole device and leave nothing to run (a deadlock
                # seen on vLLM with a small KV cache); the host copy makes the unpark cheap.
                if foot[i] <= mem:
                    mem -= foot[i]
                else:
                    decisions.append(Decision("preempt", s.id, None, "unpark"))
        return decisions

    @staticmethod
    def _gate(streams: tuple[StreamView, ...], left_out: list[int], decisions: list[Decision]) -> None:
        """Keep new requests outside the working set (``left_out``) out of the engine's queue (held, no KV): the
        engine admits whatever waits as soon as blocks free up, which would over-commit device memory."""
        for j in left_out:
            if streams[j].status is _WAITING:
                decisions.append(Decision("preempt", streams[j].id, None, "working_set"))
