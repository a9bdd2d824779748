"""``andes``: the QoE-greedy scheduler of Andes (arXiv 2404.16283, v1), as a baseline.

Each tick, only when the engine is memory-bound (device KV use above ``memory_trigger``, or every batch
slot taken) while requests wait or are paused:

* For every live request estimate the QoE gain of serving it for the next ``horizon_s`` rather than
  letting it wait: tokens its reader would digest in the horizon if served, minus those it digests
  from its buffer if not, normalised by its expected length (Andes' QoE is digested area over expected
  area). Serving costs a reload or recompute for a paused request and a prefill for a new one.
* Sort by gain per unit of memory (gain / context tokens), pack batch slots and device KV greedily.
* Preempt running requests that were not packed, but never let the average number of preemptions per
  request seen exceed ``preemption_cap`` (Andes' P, default 1), which stops thrashing.

When not triggered, every paused request is resumed (Andes serves everyone when it can).
Pure: no I/O, no clock. State: preemptions issued and requests seen.
"""

from __future__ import annotations

from typing import Any

from .knobs import AndesKnobs
from .types import Decision, EngineStatus, Snapshot

_RUNNING = EngineStatus.RUNNING
_HELD = EngineStatus.HELD
_PARKED = EngineStatus.PARKED
_WAITING = EngineStatus.WAITING


class AndesPolicy:
    name = "andes"

    def __init__(self, knobs: AndesKnobs | None = None, **overrides: Any) -> None:
        if knobs is None:
            knobs = AndesKnobs.from_mapping(overrides)
        elif overrides:
            raise TypeError("pass either knobs or keyword overrides, not both")
        self.knobs = knobs
        self._live: set[str] = set()
        self.requests_seen = 0
        self.preemptions_issued = 0

    def forget(self, stream_id: str) -> None:
        self._live.discard(stream_id)

    def _preempt_allowed(self) -> bool:
        return self.preemptions_issued + 1 <= self.knobs.preemption_cap * self.requests_seen

    def decide(self, snapshot: Snapshot, now: float) -> list[Decision]:
        streams = snapshot.streams
        live = self._live
        for s in streams:
            if s.id not in live:
                live.add(s.id)
                self.requests_seen += 1
        waiting = [s for s in streams if s.status is not _RUNNING]
        if not waiting:
            return []
        k = self.knobs
        eng = snapshot.engine
        used = sum(s.kv_device_tokens for s in streams)
        used = max(used, eng.kv_device_used_tokens)
        n_running = len(streams) - len(waiting)
        memory_bound = used > k.memory_trigger * eng.kv_device_capacity_tokens or n_running >= eng.max_num_seqs
        if not memory_bound:
            return [Decision("resume", s.id, None, "serve_all") for s in waiting if s.status in (_HELD, _PARKED)]

        step = eng.step_time_s or k.default_step_time_s
        v = 1.0 / step  # tokens/s a served request produces
        prefill = eng.prefill_tokens_per_s or k.default_prefill_tokens_per_s
        h = k.horizon_s
        scored: list[tuple[float, float, int]] = []
        for i, s in enumerate(streams):
            ctx = s.prompt_tokens + s.generated_tokens
            r = s.rate
            length = float(s.max_tokens or max(s.generated_tokens, 1))
            if s.first_token_time is None:
                overhead = 0.0 if s.status is _RUNNING else s.prompt_tokens / prefill
                # Waiting also pushes TTFT past the target: the reader loses the whole horizon.
                late = max(0.0, now - s.arrival_time + h - k.ttft_target_s)
                served = min(r * max(0.0, h - overhead), v * max(0.0, h - overhead))
                gain = (served + min(late, h) * r * 0.5) / length
            else:
                buf = max(0.0, s.buffer_tokens)
                if s.status is _RUNNING or s.status is _PARKED:
                    overhead = 0.0
                else:
                    overhead = min(ctx, max(0, ctx - s.kv_host_tokens)) / prefill
                digest_wait = min(r * h, buf)
                digest_serve = min(r * h, buf + v * max(0.0, h - overhead))
                gain = (digest_serve - digest_wait) / length
            scored.append((-gain / max(ctx, 1), s.arrival_time, i))
        scored.sort()

        slots = eng.max_num_seqs
        mem = k.memory_target * eng.kv_device_capacity_tokens
        chosen = bytearray(len(streams))
        for _, _, i in scored:
            s = streams[i]
            f = s.prompt_tokens + s.generated_tokens
            if slots > 0 and f <= mem:
                chosen[i] = 1
                slots -= 1
                mem -= f

        decisions: list[Decision] = []
        # Preempt the least valuable running requests first, within the cap.
        for _, _, i in reversed(scored):
            s = streams[i]
            if s.status is _RUNNING and not chosen[i] and s.first_token_time is not None:
                if not self._preempt_allowed():
                    break
                self.preemptions_issued += 1
                decisions.append(Decision("preempt", s.id, None, "qoe_gain"))
        for _, _, i in scored:
            s = streams[i]
            if s.status is _RUNNING:
                continue
            if chosen[i]:
                if s.status is _HELD or s.status is _PARKED:
                    decisions.append(Decision("resume", s.id, None, "qoe_gain"))
                elif s.status is _WAITING and s.priority != 0:
                    decisions.append(Decision("priority", s.id, 0, "qoe_gain"))
            elif s.status is _WAITING and s.priority != 1:
                decisions.append(Decision("priority", s.id, 1, "qoe_gain"))
        return decisions
