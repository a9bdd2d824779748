"""Measured drain in virtual-clock mode: the gateway's :class:`DrainTracker` fed by a simulated connection.

The simulated client reads at its true rate; its TCP stack acknowledges what it has read plus what its
receive buffer holds (``rcvbuf_tokens``), so the tracker sees the same kind of evidence as on a real socket
(one "byte" per token). The tracker's estimate and effective-rate rule are the gateway's own code.
"""

from __future__ import annotations

from typing import Protocol

from gateway.streams.drain import DrainSettings, DrainTracker
from gateway.streams.reader import ReaderModel


class _Stream(Protocol):
    id: str
    rate: float
    generated_tokens: int

    def set_rate(self, rate: float, now: float) -> None: ...


class SimulatedDrain:
    """Evidence for one simulated client, sampled once per policy tick."""

    __slots__ = ("_acked", "_logged", "_stream", "client", "rcvbuf_tokens", "tracker")

    def __init__(self, stream: _Stream, client: ReaderModel, declared: float, now: float, *,
                 rcvbuf_tokens: int = 8, settings: DrainSettings | None = None) -> None:
        self.client = client  # the person really reading
        self.rcvbuf_tokens = rcvbuf_tokens
        self._stream = stream
        self._acked = 0
        self._logged = 0  # tokens entered in the tracker's ledger (one event per token)
        self.tracker = DrainTracker(
            stream, settings or DrainSettings(), declared=declared, default_rate=declared,  # type: ignore[arg-type]
            unacked=lambda: stream.generated_tokens - self._acked, written_bytes=lambda: stream.generated_tokens,
            now=now,
        )

    def sample(self, now: float) -> None:
        st = self._stream
        for k in range(self._logged + 1, st.generated_tokens + 1):  # one event per token, sent when produced
            self.tracker.on_write(k, k)
        self._logged = st.generated_tokens
        self.client.advance(now)
        self._acked = min(st.generated_tokens, self.client.consumed + self.rcvbuf_tokens)
        self.tracker.sample(now)

    def consumed(self, now: float, model_consumed: int) -> int:
        return self.tracker.consumed(now, model_consumed)
