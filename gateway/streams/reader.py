"""The reader model: how a client consumes a stream at a rate, and how full its buffer is.

Token ``k`` (0-based) is consumed at ``c_k = max(a_k, c_{k-1} + 1/rate)`` with ``c_0 = a_0``, where
``a_k`` is when it was produced. With smooth pacing the gateway *sends* token ``k`` at ``c_k``; without
pacing it sends at ``a_k`` and the same model tells how many tokens sit unread in the client. Either way
``buffer = produced - consumed`` is exact at every instant.

Pure code: the caller passes the time. The bench's simulated readers use the same class.
"""

from __future__ import annotations

import math

_EPS = 1e-9


class ReaderModel:
    __slots__ = (
        "consumed",
        "finished",
        "first_token_time",
        "last_consumed_time",
        "next_due",
        "produced",
        "rate",
        "stall_time",
        "stalls",
    )

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.produced = 0
        self.consumed = 0
        self.next_due = math.inf  # when the next token may be consumed
        self.first_token_time: float | None = None
        self.last_consumed_time: float | None = None
        self.stall_time = 0.0  # time with an empty buffer after the first token (rebuffering)
        self.stalls = 0
        self.finished = False  # producer done: an empty buffer is then not a stall

    def on_tokens(self, n: int, now: float) -> None:
        """``n`` new tokens became available at ``now``."""
        if n <= 0:
            return
        self.advance(now)
        if self.first_token_time is None:
            self.first_token_time = now
            self.next_due = now
        elif self.consumed == self.produced and now > self.next_due + _EPS:
            # The reader was waiting for this token: a stall from next_due to now.
            self.stall_time += now - self.next_due
            self.stalls += 1
            self.next_due = now
        self.produced += n
        self.advance(now)

    def advance(self, now: float) -> int:
        """Consume what the reader can by ``now``; returns how many tokens were consumed."""
        avail = self.produced - self.consumed
        if avail <= 0 or now + _EPS < self.next_due:
            return 0
        k = min(avail, int((now - self.next_due) * self.rate + _EPS) + 1)
        self.consumed += k
        self.last_consumed_time = self.next_due + (k - 1) / self.rate
        self.next_due = self.last_consumed_time + 1.0 / self.rate
        return k

    def buffer(self, now: float) -> int:
        """Tokens produced but not yet consumed at ``now``."""
        self.advance(now)
        return self.produced - self.consumed

    def time_to_empty(self, now: float) -> float:
        """Seconds until the reader has consumed every produced token."""
        self.advance(now)
        left = self.produced - self.consumed
        if left <= 0:
            return 0.0
        # The last buffered token is read at next_due + (left - 1) / rate; equals buffer / rate on schedule.
        return max(0.0, self.next_due + (left - 1) / self.rate - now)

    def due_time(self) -> float:
        """When the next token will be consumed, if it is available (inf when none is)."""
        return self.next_due if self.consumed < self.produced else math.inf

    def set_rate(self, rate: float, now: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.advance(now)
        if self.last_consumed_time is not None:
            after_last = self.last_consumed_time + 1.0 / rate
            self.next_due = max(now, after_last) if self.consumed < self.produced else after_last
        self.rate = rate

    def stall_time_at(self, now: float) -> float:
        """Rebuffer time so far, including a stall still in progress."""
        self.advance(now)
        if self.finished or self.first_token_time is None or self.consumed < self.produced:
            return self.stall_time
        return self.stall_time + max(0.0, now - self.next_due)
