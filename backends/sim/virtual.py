"""Virtual-clock runner: the simulated engine without HTTP or wall time, for benchmarks.

One :class:`VirtualEngine` wraps one :class:`~backends.sim.core.EngineCore` and a discrete-event loop.
Time only advances inside ``run_until`` / ``run_until_idle``; everything else happens at ``now``.

API::

    eng = VirtualEngine(load_profile("h200-llama3-8b"), on_tokens=callback)
    eng.add("r1", prompt_tokens=512, max_tokens=2048, priority=0, at=0.0)   # arrival at virtual t=0
    eng.run_until(0.5)          # run steps until the first step boundary at or after t=0.5
    eng.state()                 # the contract's GET /control/v1/state body, at eng.now
    eng.command("preempt", "r1")            # applied at once (we are at a step boundary)
    eng.commands([{"op": "resume", "id": "r1"}])   # the batched form, one result per command
    end = eng.run_until_idle()  # until nothing is left to do; returns the virtual time

``callback(now, emitted)`` is called once per step with the step's end time and a list of
:class:`~backends.sim.core.Emitted` ``(id, index, finish_reason)``; ``finish_reason`` is ``"length"`` on a
request's last token. Requests that end by ``abort`` produce no token; the caller knows it aborted them.

Semantics:

- Steps are atomic, as in a real engine: ``run_until(t)`` runs every step that *starts* before ``t``, so
  ``now`` afterwards is the first step boundary at or after ``t`` (or exactly ``t`` when the engine is
  idle then). A policy ticking every ``dt`` calls ``run_until(now + dt)`` then issues its commands, which
  thereby apply at a step boundary, as the contract says.
- ``add(..., at=t)`` with ``t`` in the future schedules an arrival; the request joins the engine at the
  first step boundary at or after ``t`` (an idle engine wakes at ``t`` exactly). ``at=None`` means now.
- Control commands and aborts act immediately on the core (between steps).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .core import OPS, DuplicateId, Emitted, EngineCore, Step
from .profile import Profile

TokenCallback = Callable[[float, list[Emitted]], None]


class VirtualEngine:
    def __init__(self, profile: Profile, *, on_tokens: TokenCallback | None = None, **core_kwargs: Any) -> None:
        """``core_kwargs`` go to :class:`EngineCore` (default_max_tokens, write_through, engine_preempt)."""
        self.core = EngineCore(profile, **core_kwargs)
        self.profile = profile
        self.on_tokens = on_tokens
        self.now = 0.0
        self._arrivals: list[tuple[float, int, str, int, int | None, int]] = []
        self._seq = 0
        self._pending_ids: set[str] = set()
        self.steps = 0
        self.busy_s = 0.0  # virtual time spent in steps

    # ------------------------------------------------------------------ input

    def add(
        self, req_id: str, prompt_tokens: int, max_tokens: int | None = None, priority: int = 0, at: float | None = None
    ) -> None:
        """Submit a request now, or schedule its arrival at virtual time ``at``.

        Raises DuplicateId if the id is live or already scheduled, ValueError for impossible lengths."""
        if req_id in self._pending_ids:
            raise DuplicateId(f"request id '{req_id}' is already scheduled")
        if at is None or at <= self.now:
            self.core.add(req_id, prompt_tokens, max_tokens, priority, self.now)
        else:
            if req_id in self.core:
                raise DuplicateId(f"request id '{req_id}' is already live")
            self._pending_ids.add(req_id)
            self._seq += 1
            heapq.heappush(self._arrivals, (at, self._seq, req_id, prompt_tokens, max_tokens, priority))

    def command(self, op: str, req_id: str, priority: int | None = None) -> dict[str, Any]:
        """Apply one control command at ``now``; returns the contract's result object."""
        return self.core.command(op, req_id, self.now, priority=priority)

    def commands(self, cmds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The batched form (``{"op", "id", ["priority"]}`` dicts), applied in order."""
        out = []
        for c in cmds:
            op, rid = c.get("op"), c.get("id")
            if not isinstance(op, str) or op not in OPS or not isinstance(rid, str):
                out.append({"id": rid, "op": op, "ok": False,
                            "error": {"code": "invalid_command", "message": "bad 'op' or 'id'"}})
                continue
            out.append(self.core.command(op, rid, self.now, priority=c.get("priority")))
        return out

    def abort(self, req_id: str) -> bool:
        return self.core.abort(req_id)

    def state(self) -> dict[str, Any]:
        return self.core.state(self.now)

    def control_state(self) -> dict[str, Any]:
        """The state as a control round reads it (may cost the engine time: EngineCore.read_state)."""
        return self.core.read_state(self.now)

    @property
    def pending_arrivals(self) -> int:
        return len(self._arrivals)

    # ------------------------------------------------------------------ time

    def run_until(self, t: float) -> float:
        """Run until the first step boundary at or after ``t``; returns ``now``."""
        self._run(t)
        return self.now

    def run_steps(self, n: int) -> float:
        """Run up to ``n`` more engine steps, stopping early when nothing can be computed now (an idle engine
        does not advance the clock here); returns ``now``."""
        for _ in range(n):
            self._admit_arrivals()
            step = self.core.next_step(self.now)
            if step is None:
                break
            self._do_step(step)
        return self.now

    def run_until_idle(self, limit: float = math.inf) -> float:
        """Run until no request is live and no arrival is pending (or ``limit``); returns ``now``."""
        self._run(limit, stop_when_idle=True)
        return self.now

    def _admit_arrivals(self) -> None:
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= self.now:
            _, _, rid, p, m, pr = heapq.heappop(arrivals)
            self._pending_ids.discard(rid)
            self.core.add(rid, p, m, pr, self.now)

    def _do_step(self, step: Step) -> None:
        end = self.now + step.duration
        emitted = self.core.complete_step(step, end)
        self.now = end
        self.steps += 1
        self.busy_s += step.duration
        if self.on_tokens is not None and emitted:
            self.on_tokens(end, emitted)

    def _run(self, t: float, stop_when_idle: bool = False) -> None:
        core = self.core
        arrivals = self._arrivals
        while True:
            self._admit_arrivals()
            if self.now >= t:
                return
            step = core.next_step(self.now)
            if step is not None:
                self._do_step(step)
                continue
            # idle: jump to the next thing that can change the engine
            nxt = t
            ev = core.next_event_time()
            if ev is not None and ev < nxt:
                nxt = ev if ev > self.now else self.now
            if arrivals and arrivals[0][0] < nxt:
                nxt = arrivals[0][0]
            if stop_when_idle and not core.reqs and not arrivals:
                return
            if nxt == math.inf:
                # live requests that can never run (e.g. held, nobody to resume them): stop here
                return
            if nxt <= self.now and ev is None:
                return  # nothing will ever change without input
            self.now = max(self.now, nxt)


def _burst_main(argv: list[str] | None = None) -> int:
    """``python -m backends.sim.virtual``: time a burst on the virtual clock (no policy: plain fcfs)."""
    import argparse
    import time

    from .profile import load_profile

    ap = argparse.ArgumentParser(prog="python -m backends.sim.virtual", description=_burst_main.__doc__)
    ap.add_argument("--profile", default="h200-llama3-8b")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=2048)
    ap.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute")
    args = ap.parse_args(argv)
    first: dict[str, float] = {}
    tokens = 0

    def cb(now: float, emitted: list[Emitted]) -> None:
        nonlocal tokens
        tokens += len(emitted)
        for e in emitted:
            if e.position == 0:
                first[e.id] = now

    eng = VirtualEngine(load_profile(args.profile), on_tokens=cb, engine_preempt=args.engine_preempt)
    for i in range(args.requests):
        eng.add(f"r{i}", args.prompt, args.output, at=0.0)
    t0 = time.process_time()
    end = eng.run_until_idle()
    cpu = time.process_time() - t0
    ttft = sorted(first.values())
    c = eng.state()["engine"]["counters"]
    print(f"{args.requests} x ({args.prompt} in, {args.output} out) on {args.profile}: "
          f"cpu {cpu:.2f} s for {end:.1f} s virtual, {eng.steps} steps, {tokens} tokens")
    if ttft:
        print(f"TTFT p50 {ttft[len(ttft) // 2]:.2f} s, p99 {ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))]:.2f} s; "
              f"preemptions {c['preemptions']}, recomputed tokens {c['recomputed_tokens']}, "
              f"host-restored tokens {c['host_restored_tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_burst_main())
