"""Measured drain: how fast each client really takes its tokens, from its connection alone.

Every event the writer hands to the transport is logged as (bytes written so far, tokens so far). Bytes
still in the transport's buffer or in the kernel's send queue (``SIOCOUTQ``: written but not acknowledged
by the client's TCP stack) have not reached the client; the rest have, so the ledger turns the
acknowledged byte count into a token count. One sampler per process reads every tracked socket each
``sample_interval_s`` and feeds the counts to a :class:`RateEstimator` per stream.

The estimator only counts stretches where the client was the bottleneck: the backlog at the start of a
sample interval was larger than what the client took during it (the backlog never emptied), so the
client, not the supply, set the pace. Within such a run, the rate is the slope between the first and the
last instants at which the acknowledged count moved, over a sliding window. Acknowledgements come in
steps (the client's TCP stack reopens its window only once it freed a good part of its receive buffer),
so measuring from step to step rather than over a fixed window avoids quantisation error.

A client is *stalled* when a backlog is waiting and nothing was acknowledged for longer than
``clamp(stall_gap_factor * typical step gap, stall_after_s, 4 * stall_after_s)``.

The rule that turns evidence into the effective rate used by pacing and by the policy is
:func:`effective_rate`; docs/drain-rate.md explains it and the measurement's limits.
"""

from __future__ import annotations

import bisect
import logging
import math
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from fcntl import ioctl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ..metrics import Metrics
    from .base import StreamBase
    from .stream import Stream

log = logging.getLogger("tokenflow.drain")

SIOCOUTQ: int | None
try:  # Linux: SIOCOUTQ == TIOCOUTQ, bytes in the send queue not yet acknowledged by the peer
    from termios import TIOCOUTQ

    SIOCOUTQ = TIOCOUTQ
except ImportError:  # pragma: no cover - non-Unix
    SIOCOUTQ = None
_HAS_OUTQ = SIOCOUTQ is not None and sys.platform.startswith("linux")


@dataclass(frozen=True, slots=True)
class DrainSettings:
    """The ``drain`` config section (see gateway/config.py for each option's meaning)."""

    enabled: bool = True
    sample_interval_s: float = 0.25
    window_s: float = 6.0
    min_span_s: float = 1.0
    stall_after_s: float = 3.0
    stall_gap_factor: float = 3.0
    probe_after_s: float = 2.0
    probe_factor: float = 1.25
    learn_max_rate: float = 20.0
    deadband: float = 0.15
    min_rate: float = 0.1  # floor: a stalled client is paced and scheduled at this rate
    max_rate: float = 1000.0


def settings_from(cfg: Any) -> DrainSettings:
    """DrainSettings from the gateway :class:`~gateway.config.Config` (``drain`` plus the streams' rate bounds)."""
    return DrainSettings(**cfg.drain.model_dump(), min_rate=cfg.streams.min_rate, max_rate=cfg.streams.max_rate)


def stream_fields(stream: StreamBase, now: float) -> dict[str, Any]:
    """The drain fields of a stream's listing entry (a stream not tracked yet shows its declared rate).

    For a tracked stream, buffer, consumed count and time-to-empty come from the evidence (what the policy
    sees), replacing the reader model's values.
    """
    tr = stream.drain
    if tr is not None:
        buf = int(stream.buffer_tokens(now))
        rate = stream.rate
        return {
            "buffer_tokens": buf,
            "consumed_tokens": tr.stream.base + stream.reader.produced - buf,
            "time_to_empty_s": round(buf / rate, 4) if rate > 0 else None,
            **tr.info(),
        }
    return {
        "rate_declared_value": stream.rate if stream.rate_declared else None,
        "rate_measured": None,
        "rate_source": "declared" if stream.rate_declared else "default",
        "stalled": False,
        "stalls": 0,
        "written_tokens": stream.released_tokens,
        "acked_tokens": None,
        "reported_tokens": None,
    }


class RateEstimator:
    """Drain rate from cumulative consumption observations. Pure: the caller passes the time."""

    __slots__ = (
        "_last",
        "_points",
        "_stall_gap",
        "gap_factor",
        "last_advance",
        "limited",
        "min_span_s",
        "rate",
        "stall_after_s",
        "waiting_since",
        "window_s",
    )

    def __init__(self, window_s: float = 6.0, min_span_s: float = 1.0, stall_after_s: float = 3.0,
                 gap_factor: float = 3.0) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.stall_after_s = stall_after_s
        self.gap_factor = gap_factor
        # (time, consumed) where consumption moved, this run. A list: a deque's first block costs ~760 B even
        # nearly empty, and there are two per client connection; trimming is one slice deletion per step.
        self._points: list[tuple[float, int]] = []
        self._last: tuple[float, int, int] | None = None  # (time, consumed, backlog) of the last observation
        self.rate: float | None = None  # latest estimate (tokens/s); kept when the run ends
        self.limited = False  # the client was the bottleneck over the last interval
        self.waiting_since: float | None = None  # a backlog has been waiting, untouched, since then
        self.last_advance: float | None = None
        self._stall_gap: float | None = None  # the wait that ended the last run, as a hint of this client's steps

    def observe(self, t: float, consumed: int, backlog: int) -> None:
        """At ``t`` the client had taken ``consumed`` tokens in all and ``backlog`` more were available to it."""
        last = self._last
        self._last = (t, consumed, backlog)
        if last is None:
            self.waiting_since = t if backlog > 0 else None
            return
        _, pc, pb = last
        taken = consumed - pc
        if taken > 0:
            if self.stalled(t):  # moving again after a stall: the stall is not a rate; start afresh
                self._points.clear()
                self.rate = None
                if self.waiting_since is not None:
                    self._stall_gap = t - self.waiting_since  # a client with long steps is not stalled twice
            self.last_advance = t
        self.limited = pb > 0 and taken < pb  # the backlog never emptied: the client set the pace
        if not self.limited:
            self._points.clear()
            if taken > 0:
                self._points.append((t, consumed))  # may open the next run
        elif taken > 0:
            pts = self._points
            pts.append((t, consumed))
            k, horizon = 0, t - self.window_s
            while len(pts) - k > 2 and pts[k + 1][0] <= horizon:
                k += 1
            if k:
                del pts[:k]
            span = pts[-1][0] - pts[0][0]
            if span >= self.min_span_s:
                self.rate = (pts[-1][1] - pts[0][1]) / span
        if backlog <= 0:
            self.waiting_since = None
        elif taken > 0 or self.waiting_since is None:
            self.waiting_since = t

    def typical_gap(self) -> float | None:
        """Mean time between consumption steps in the current run (None with fewer than two)."""
        pts = self._points
        if len(pts) < 2:
            return self._stall_gap
        return (pts[-1][0] - pts[0][0]) / (len(pts) - 1)

    def stalled(self, now: float) -> bool:
        """A backlog has waited, untouched, longer than the stall limit (adapted to the client's usual steps)."""
        if self.waiting_since is None:
            return False
        gap = self.typical_gap()
        after = self.stall_after_s
        limit = after if gap is None else min(max(self.gap_factor * gap, after), 4 * after)
        return now - self.waiting_since > limit

    def reset_run(self) -> None:
        self._points.clear()


def rate_cap(declared: float | None, default: float, s: DrainSettings) -> float:
    """The highest rate probing reaches: the declared rate, or (undeclared) ``learn_max_rate`` at least."""
    return declared if declared is not None else max(default, s.learn_max_rate)


def effective_rate(
    *,
    current: float,
    declared: float | None,
    default: float,
    measured: float | None,
    limited: bool,
    stalled: bool,
    smooth: bool,
    keeping_up_s: float,
    s: DrainSettings,
) -> float:
    """The rate pacing and the policy use, from the declared rate and the evidence.

    * Stalled: the floor ``min_rate`` (its buffer then reads as lasting for ages, so the policy can pause it).
    * The client is the bottleneck and a measurement exists: the measured rate, unless it is within
      ``deadband`` of the declared rate (noise: the declared rate stands). Smooth pacing never goes
      above the declared rate (or, undeclared, ``learn_max_rate``); unpaced streams may read faster.
    * The client keeps up with everything sent: probe upward by ``probe_factor`` every ``probe_after_s``,
      up to the declared rate (undeclared: ``learn_max_rate``), so a client measured slow once is not
      starved once it reads faster.
    * No evidence: unchanged (the declared rate, or the default class when none was declared).
    """
    cap = rate_cap(declared, default, s)
    if stalled:
        return s.min_rate
    if limited and measured is not None:
        if declared is not None and abs(measured - declared) <= s.deadband * declared:
            return declared  # within measurement noise of its promise: keep the promise
        top = cap if smooth else s.max_rate
        return min(max(measured, s.min_rate), top)
    if not limited and keeping_up_s >= s.probe_after_s and current < cap:
        return min(cap, current * s.probe_factor)
    return min(max(current, s.min_rate), max(cap, current) if not smooth else cap)


class DrainTracker:
    """One client connection's evidence: written ledger, acknowledged tokens, reported progress, rates."""

    def __init__(
        self,
        stream: Stream,
        settings: DrainSettings,
        *,
        declared: float | None,
        default_rate: float,
        unacked: Callable[[], int | None],
        written_bytes: Callable[[], int],
        owner: str | None = None,
        now: float,
    ) -> None:
        self.stream = stream
        self.s = settings
        self.declared = declared
        self.default_rate = default_rate
        self._cap = rate_cap(declared, default_rate, settings)  # both are fixed for the connection's life
        self.owner = owner  # the API key name that opened the stream (None: no keys configured)
        self._unacked = unacked
        self._written_bytes = written_bytes
        # Cumulative bytes and reader-relative tokens after each write, kept until acknowledged: a stalled
        # client's grow with every write, so machine integers (8 bytes) rather than int objects (~40).
        self._ledger_bytes = array("q")
        self._ledger_tokens = array("q")
        self.written_tokens = 0
        self.acked_bytes = 0
        self.acked_tokens = 0
        est = (settings.window_s, settings.min_span_s, settings.stall_after_s, settings.stall_gap_factor)
        self.socket = RateEstimator(*est)
        self.progress = RateEstimator(*est)
        self.reported: int | None = None
        self.reported_at: float | None = None
        self.stalled = False
        self.stalled_since: float | None = None
        self.stalls = 0
        self.stalls_exported = 0
        self.rate_before_stall: float | None = None
        self._keeping_up_since: float | None = now
        self._last_probe: float = now

    # --- writer side ---
    def on_write(self, tokens_end: int, bytes_end: int | None = None) -> None:
        """The writer handed the transport everything up to reader-relative token ``tokens_end`` (and
        ``bytes_end`` bytes in all; default: the writer's own count)."""
        b = self._written_bytes() if bytes_end is None else bytes_end
        if self._ledger_bytes and self._ledger_tokens[-1] == tokens_end:
            self._ledger_bytes[-1] = b  # no new token (e.g. the closing event): extend the last entry
        else:
            self._ledger_bytes.append(b)
            self._ledger_tokens.append(tokens_end)
        self.written_tokens = tokens_end

    # --- evidence ---
    def sample(self, now: float) -> None:
        written = self._written_bytes()
        unacked = self._unacked()
        if unacked is None:  # the connection is closing: no new evidence
            return
        acked = max(self.acked_bytes, written - unacked)
        self.acked_bytes = acked
        i = bisect.bisect_right(self._ledger_bytes, acked) - 1
        if i >= 0:
            self.acked_tokens = self._ledger_tokens[i]
            if i > 64:  # drop entries already acknowledged, in batches
                del self._ledger_bytes[:i]
                del self._ledger_tokens[:i]
        self.socket.observe(now, self.acked_tokens, self.written_tokens - self.acked_tokens)
        self._update(now)

    def report(self, consumed: int, now: float) -> None:
        """The client says it has consumed ``consumed`` tokens (validated by the caller)."""
        self.progress.observe(now, consumed, max(0, self.written_tokens - consumed))
        self.reported = consumed
        self.reported_at = now
        self._update(now)

    @property
    def measured_rate(self) -> float | None:
        return self.progress.rate if self.reported is not None and self.progress.rate is not None else self.socket.rate

    @property
    def source(self) -> str:
        if self.stalled:
            return "stalled"
        if self.reported is not None and self.progress.rate is not None:
            return "reported"
        if self.socket.limited and self.socket.rate is not None:
            return "measured"
        if self.declared is not None:
            return "declared"
        return "learned" if self.stream.rate != self.default_rate else "default"

    def _update(self, now: float) -> None:
        s = self.s
        est = self.progress if self.reported is not None else self.socket
        stalled = self.socket.stalled(now) or (self.reported is not None and self.progress.stalled(now))
        current = self.stream.rate
        if stalled and not self.stalled:
            self.stalled, self.stalled_since = True, now
            self.stalls += 1
            self.rate_before_stall = current
        elif not stalled and self.stalled:
            self.stalled, self.stalled_since = False, None
            # Reading again: back to the declared (or default) rate at least; a slow client is measured anew.
            current = max(self.rate_before_stall or 0.0, self.declared or self.default_rate)
            est.reset_run()
        if est.limited or self.stalled:
            self._keeping_up_since = None
        else:
            if self._keeping_up_since is None:
                self._keeping_up_since = now
            if current == self._cap == self.stream.rate:
                # Keeping up at the cap, the common case: effective_rate() returns the cap here (no probe
                # above it, the clamp keeps it), so nothing changes. A stall that just ended left the stream
                # at the floor (stream.rate != current): that one takes the full path.
                return
        keeping_up = 0.0
        if self._keeping_up_since is not None:
            keeping_up = now - max(self._keeping_up_since, self._last_probe)
        new = effective_rate(
            current=current,
            declared=self.declared,
            default=self.default_rate,
            measured=est.rate,
            limited=est.limited,
            stalled=self.stalled,
            smooth=self.stream.pacing != "none",  # paced: smooth or phrase
            keeping_up_s=keeping_up,
            s=s,
        )
        if new > current and not self.stalled and not est.limited:
            self._last_probe = now
        if not math.isclose(new, self.stream.rate, rel_tol=1e-3):
            self.stream.set_rate(new, now)

    def consumed(self, now: float, model_consumed: int) -> int:
        """Reader-relative tokens the client has consumed by ``now``, from the best evidence.

        With progress reports: the last report, plus what the client reads at its rate since, up to what was
        written. Otherwise: what its TCP stack acknowledged, but never more than the reader model allows.
        """
        if self.reported is not None and self.reported_at is not None:
            ahead = int(self.stream.rate * max(0.0, now - self.reported_at) + 1e-9) if not self.stalled else 0
            return max(self.reported, min(self.written_tokens, self.reported + ahead))
        return min(self.acked_tokens, model_consumed)

    def info(self) -> dict[str, Any]:
        m = self.measured_rate
        return {
            "rate_declared_value": self.declared,
            "rate_measured": None if m is None else round(m, 3),
            "rate_source": self.source,
            "stalled": self.stalled,
            "stalls": self.stalls,
            "written_tokens": self.written_tokens,
            "acked_tokens": self.acked_tokens,
            "reported_tokens": self.reported,
        }


# The sampler's pass over every connection is cut into this many slices, one per 1/SLICES of the interval:
# each connection is still sampled once per interval, but no single callback walks thousands of sockets
# (at 1,500 streams a whole pass holds the event loop for ~10 ms, which would show as pacing lateness).
SLICES = 5


class DrainSampler:
    """One per process: samples every tracked connection on one timer, not a timer per stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: DrainSettings, metrics: Metrics | None = None
                 ) -> None:
        self._loop = loop
        self.s = settings
        self.trackers: dict[str, DrainTracker] = {}
        self._slices: list[dict[str, DrainTracker]] = [{} for _ in range(SLICES)]
        self._slot_of: dict[str, int] = {}
        self._assigned = 0  # round robin over the slices
        self._turn = 0  # the slice the next timer call samples
        self._timer: asyncio.TimerHandle | None = None
        self.metrics = metrics
        self.samples = 0  # whole passes over every connection
        self._stalled_engines: set[str] = set()

    def attach(self, stream: Stream, transport: Any, writer: Any, *, declared: float | None, default_rate: float,
               owner: str | None) -> DrainTracker | None:
        """Track ``stream``'s connection; None when disabled or the transport is gone."""
        if not self.s.enabled or transport is None:
            return None
        sock = transport.get_extra_info("socket")
        # Without SIOCOUTQ (not Linux) only the transport's buffer counts: a stall shows much later.
        fd = sock.fileno() if sock is not None and _HAS_OUTQ else -1
        closing = transport.is_closing
        buffered = transport.get_write_buffer_size
        outq = array("i", [0])  # the ioctl fills it in place: no allocation per sample

        def unacked() -> int | None:
            if closing():
                return None
            n: int = buffered()
            if fd >= 0 and SIOCOUTQ is not None:
                try:
                    ioctl(fd, SIOCOUTQ, outq)
                    n += outq[0]
                except OSError:  # unknown: the transport's buffer alone counts
                    pass
            return n

        tr = DrainTracker(
            stream, self.s, declared=declared, default_rate=default_rate, unacked=unacked,
            written_bytes=lambda: writer.output_size, owner=owner, now=self._loop.time(),
        )
        stream.drain = tr
        sid = stream.id
        old = self._slot_of.get(sid)
        if old is not None:  # a newer connection of the same stream replaces the older one's tracker
            self._slices[old].pop(sid, None)
        slot = self._slot_of[sid] = self._assigned % SLICES
        self._assigned += 1
        self._slices[slot][sid] = tr
        self.trackers[sid] = tr
        if self._timer is None:
            self._arm()
        return tr

    def detach(self, stream: Stream, tracker: DrainTracker | None) -> None:
        """The writer is done: stop tracking; record the client's declared and measured rates."""
        if tracker is None:
            return
        sid = stream.id
        if self.trackers.get(sid) is tracker:
            del self.trackers[sid]
            self._slices[self._slot_of.pop(sid)].pop(sid, None)
        if stream.drain is tracker:
            stream.drain = None
        m = self.metrics
        if m is not None:
            e = stream.engine
            if tracker.declared is not None:
                m.client_rate.labels(e, "declared").observe(tracker.declared)
            measured = tracker.measured_rate
            if measured is not None:
                m.client_rate.labels(e, "measured").observe(measured)
                if tracker.declared is not None:
                    m.client_rate_ratio.labels(e).observe(measured / tracker.declared)
            m.client_rate.labels(e, "effective").observe(stream.rate)

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self.s.sample_interval_s / SLICES, self._tick)

    def _tick(self) -> None:
        """Sample one slice of the connections; after the last slice, export the metrics of the whole pass."""
        self._timer = None
        now = self._loop.time()
        turn = self._turn
        self._turn = (turn + 1) % SLICES
        for tr in list(self._slices[turn].values()):
            try:
                tr.sample(now)
            except Exception:  # one odd socket must not stop sampling for everyone
                log.exception("drain sample failed", extra={"stream_id": tr.stream.id})
        if self._turn == 0:
            self.samples += 1
            if self.metrics is not None:
                self._export(self.metrics)
        if self.trackers:
            self._arm()

    def _export(self, m: Metrics) -> None:
        stalled: dict[str, int] = {}
        for tr in self.trackers.values():
            e = tr.stream.engine
            stalled[e] = stalled.get(e, 0) + (1 if tr.stalled else 0)
            if tr.stalls != tr.stalls_exported:
                m.client_stalls.labels(e).inc(tr.stalls - tr.stalls_exported)
                tr.stalls_exported = tr.stalls
        for e in self._stalled_engines - set(stalled):
            m.clients_stalled.labels(e).set(0)
        for e, n in stalled.items():
            m.clients_stalled.labels(e).set(n)
        self._stalled_engines = set(stalled)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.trackers.clear()
        self._slot_of.clear()
        for sl in self._slices:
            sl.clear()
