"""Snapshot and decision types shared by every policy.

A policy sees an immutable :class:`Snapshot` of one engine and the current time and returns
:class:`Decision` objects. Nothing here does I/O or reads a clock, so the same policy runs on the
gateway's wall clock and on the simulator's virtual clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# The engine's side of a snapshot is the control API's state, as parsed by the engine client.
from ..engines.control_api import EngineStatus, EngineView, Op

__all__ = [
    "Decision", "EngineStatus", "EngineView", "Op", "Policy", "PolicyStats", "ReportsTicks", "Snapshot", "StreamView",
    "tick_worth_recording",
]


# StreamView and Decision are read-only by contract (nothing assigns to them after construction) but not
# ``frozen``: a frozen dataclass's __init__ sets each field through object.__setattr__, which makes building
# one about 6x slower, and every control tick builds one view per stream (2 ms at 1,000 streams) and one
# decision per command (docs/benchmarks.md, "Scheduler cost").
@dataclass(slots=True)
class StreamView:
    """What the policy knows of one stream on one engine (read-only: see above)."""

    id: str
    status: EngineStatus
    arrival_time: float  # when the gateway accepted the request
    rate: float  # tokens/s the client consumes (effective rate)
    prompt_tokens: int
    generated_tokens: int  # output tokens produced by the engine so far
    buffer_tokens: float  # produced but not yet consumed by the client
    first_token_time: float | None  # None until the first token was produced
    max_tokens: int | None  # requested output length (None: unknown)
    kv_device_tokens: int
    kv_host_tokens: int
    priority: int = 0
    preemptions: int = 0
    stalled: bool = False  # the client stopped draining (measured): it needs no engine until it reads again

    @property
    def started(self) -> bool:
        return self.first_token_time is not None

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def remaining_tokens(self) -> int | None:
        if self.max_tokens is None:
            return None
        return max(0, self.max_tokens - self.generated_tokens)

    @property
    def time_to_empty(self) -> float:
        """Seconds until the client's buffer runs dry at its rate (0 when not started)."""
        if self.rate <= 0:
            return float("inf")
        return max(0.0, self.buffer_tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Snapshot:
    engine: EngineView
    streams: tuple[StreamView, ...]
    tick_interval_s: float


@dataclass(slots=True)
class Decision:
    """One command for the engine (read-only: see above)."""

    op: Op
    id: str
    priority: int | None = None
    reason: str = ""  # short, for logs and metrics labels

    def to_command(self) -> dict[str, object]:
        cmd: dict[str, object] = {"op": self.op, "id": self.id}
        if self.op == "priority":
            cmd["priority"] = self.priority
        return cmd


class Policy(Protocol):
    """A scheduling policy: pure, deterministic given its inputs and its own state.

    A policy may keep state between ticks (for example preemption counts) but never does I/O and never
    reads a clock: ``now`` is the only time it knows.
    """

    name: str

    def decide(self, snapshot: Snapshot, now: float) -> list[Decision]: ...

    def forget(self, stream_id: str) -> None:
        """Drop any state kept for a stream that ended."""


@runtime_checkable
class ReportsTicks(Protocol):
    """A policy that can say what its last tick saw and chose (JSON-able values), for the control loop's log line
    and gauges: why requests are held, for example. Optional: a policy without it is logged by its decisions."""

    def tick_report(self) -> Mapping[str, float | int | str]: ...


def tick_worth_recording(report: Mapping[str, float | int | str], decided: bool) -> bool:
    """Whether a tick's report goes to the log (the gateway) or the run's record (the simulator): when the policy
    decided something or kept new requests out of the engine; not every quiet tick of a long run."""
    return decided or bool(report.get("held_new")) or bool(report.get("deferred_new"))


@dataclass(slots=True)
class PolicyStats:
    decisions: dict[str, int] = field(default_factory=dict)
