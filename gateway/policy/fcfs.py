"""``fcfs``: never preempts. What a plain engine does on its own."""

from __future__ import annotations

from .types import Decision, Snapshot


class FcfsPolicy:
    name = "fcfs"

    def decide(self, snapshot: Snapshot, now: float) -> list[Decision]:
        return []

    def forget(self, stream_id: str) -> None:
        return None
