"""Stream states that replicas publish each tick, and the BufferSource the engine's driver builds from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class PublishedStream:
    """One stream as its replica saw it at ``at_wall`` (unix seconds); times are wall-clock for portability."""

    id: str
    arrival_wall: float
    max_tokens: int | None
    rate: float
    generated: int
    first_token_wall: float | None
    buffer: float
    attached: bool  # a client writer is attached on that replica (its reader model is the truth)

    def to_list(self) -> list[object]:
        return [self.id, round(self.arrival_wall, 4), self.max_tokens, self.rate, self.generated,
                None if self.first_token_wall is None else round(self.first_token_wall, 4), round(self.buffer, 3),
                1 if self.attached else 0]

    @classmethod
    def from_list(cls, v: list[Any]) -> PublishedStream:
        """From :meth:`to_list`'s JSON array (raises TypeError, ValueError or IndexError when malformed)."""
        return cls(str(v[0]), float(v[1]), None if v[2] is None else int(v[2]), float(v[3]), int(v[4]),
                   None if v[5] is None else float(v[5]), float(v[6]), bool(v[7]))


@dataclass(slots=True)
class RemoteStream:
    """A BufferSource (gateway.policy.snapshot) for a stream served by another replica.

    Times are on the local monotonic clock. Between publications the client keeps reading at its rate, so the
    buffer is extrapolated down from the published value (at most one tick old).
    """

    id: str
    arrival_time: float
    max_tokens: int | None
    rate: float
    generated_tokens: int
    first_token_time: float | None
    buffer_at: float
    at: float
    attached: bool

    def buffer_tokens(self, now: float) -> float:
        if self.first_token_time is None:
            return self.buffer_at
        return max(0.0, self.buffer_at - self.rate * max(0.0, now - self.at))

    @classmethod
    def from_published(cls, p: PublishedStream, at_wall: float, wall_now: float, now: float) -> RemoteStream:
        off = now - wall_now  # local monotonic = wall + off
        return cls(p.id, p.arrival_wall + off, p.max_tokens, p.rate, p.generated,
                   None if p.first_token_wall is None else p.first_token_wall + off, p.buffer, at_wall + off,
                   p.attached)
