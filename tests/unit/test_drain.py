"""Drain-rate estimator, tracker and effective-rate rule, on synthetic clocks (no sockets)."""

from __future__ import annotations

import math
import socket
import sys
import time

import pytest

from gateway.streams.drain import DrainSampler, DrainSettings, DrainTracker, RateEstimator, effective_rate

S = DrainSettings()


def feed_stepwise(est: RateEstimator, rate: float, step_tokens: int, until: float, dt: float = 0.25,
                  supply: int = 10_000) -> None:
    """A client reading ``rate`` tok/s whose acknowledgements arrive in steps of ``step_tokens``."""
    t = 0.0
    while t <= until:
        read = int(rate * t)
        acked = (read // step_tokens) * step_tokens
        est.observe(t, acked, supply - acked)
        t += dt


@pytest.mark.parametrize("rate,step", [(5.0, 6), (5.0, 30), (2.0, 6), (20.0, 10), (50.0, 1)])
def test_rate_from_stepped_acknowledgements(rate, step):
    est = RateEstimator(window_s=6.0, min_span_s=1.0)
    feed_stepwise(est, rate, step, until=15.0)
    assert est.rate == pytest.approx(rate, rel=0.1)
    assert est.limited


def test_no_measurement_while_the_client_keeps_up():
    est = RateEstimator()
    t, acked = 0.0, 0
    for _ in range(100):  # everything written is acknowledged by the next sample: the supply sets the pace
        est.observe(t, acked, 0)
        acked += 3
        t += 0.25
    assert est.rate is None and not est.limited
    assert not est.stalled(t)


def test_window_follows_a_slowdown():
    est = RateEstimator(window_s=4.0, min_span_s=1.0)
    t, acked = 0.0, 0
    while t < 10:
        est.observe(t, acked, 500)
        acked += 5  # 20 tok/s
        t += 0.25
    assert est.rate == pytest.approx(20, rel=0.05)
    while t < 20:
        est.observe(t, acked, 500)
        acked += 1  # 4 tok/s
        t += 0.25
    assert est.rate == pytest.approx(4, rel=0.1)


def test_stall_detected_within_bound():
    est = RateEstimator()
    t, acked = 0.0, 0
    while t < 5:
        est.observe(t, acked, 200)
        acked += 2  # 8 tok/s, steps every sample
        t += 0.25
    stop = t
    while not est.stalled(t):
        est.observe(t, acked, 200)  # backlog waits, nothing acknowledged
        t += 0.25
        assert t - stop < 10
    assert 3.0 <= t - stop <= 3.0 + 0.5  # stall_after_s plus a sample or two
    est.observe(t, acked + 2, 200)
    assert not est.stalled(t)
    assert est.rate is None  # the stall is not a rate: measured afresh from here


def test_slow_steps_are_not_a_stall():
    """A slow reader whose window opens every 2 s is not stalled between steps (adaptive threshold)."""
    est = RateEstimator(stall_after_s=1.0)
    t = 0.0
    stalled = False
    while t < 30:
        acked = int(t / 2.0) * 6  # 3 tok/s in steps of 6
        est.observe(t, acked, 500)
        if t > 4.5:  # once its steps were seen (before that, 2 s of silence is longer than stall_after_s)
            stalled |= est.stalled(t)
        t += 0.25
    assert not stalled
    assert est.rate == pytest.approx(3.0, rel=0.1)


def rule(**kw):
    base = dict(current=20.0, declared=20.0, default=8.0, measured=None, limited=False, stalled=False,
                smooth=True, keeping_up_s=0.0, s=S)
    base.update(kw)
    return effective_rate(**base)


def test_effective_rate_rule():
    assert rule() == 20.0  # no evidence: declared
    assert rule(measured=5.0, limited=True) == 5.0  # slower than declared: follow the client
    assert rule(measured=30.0, limited=True) == 20.0  # smooth pacing never exceeds the declared rate
    assert rule(measured=30.0, limited=True, smooth=False) == 30.0  # unpaced: the policy sees the real speed
    assert rule(stalled=True, measured=5.0, limited=True) == S.min_rate  # stalled: a buffer that lasts for ages
    # keeping up again after being measured slow: probe back up, never past the declared rate
    assert rule(current=5.0, measured=5.0, keeping_up_s=2.5) == pytest.approx(5.0 * S.probe_factor)
    assert rule(current=19.0, keeping_up_s=2.5) == 20.0
    assert rule(current=5.0, measured=5.0, keeping_up_s=0.5) == 5.0
    # undeclared: the default class to start with, learned from the drain, probing up to learn_max_rate
    assert rule(current=8.0, declared=None, measured=3.0, limited=True) == 3.0
    assert rule(current=19.0, declared=None, keeping_up_s=3) == S.learn_max_rate


@pytest.mark.parametrize("declared,default", [(20.0, 20.0), (None, 8.0), (None, 30.0), (0.05, 0.05)])
@pytest.mark.parametrize("smooth", [True, False])
def test_keeping_up_at_the_cap_stays_there(declared, default, smooth):
    """The tracker skips the rule for a client keeping up at its cap: the rule must return the cap there."""
    cap = declared if declared is not None else max(default, S.learn_max_rate)
    for keeping_up_s in (0.0, 1.0, S.probe_after_s, 100.0):
        for measured in (None, 0.5, cap, 500.0):
            assert rule(current=cap, declared=declared, default=default, measured=measured, smooth=smooth,
                        keeping_up_s=keeping_up_s) == cap


class FakeStream:
    def __init__(self, rate: float, pacing: str = "smooth") -> None:
        self.id = "s1"
        self.engine = "e"
        self.rate = rate
        self.pacing = pacing
        self.changes: list[tuple[float, float]] = []

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = rate
        self.changes.append((now, rate))


class FakeConn:
    """Bytes written by the gateway, and how many the client's stack has acknowledged."""

    def __init__(self) -> None:
        self.written = 0
        self.acked = 0

    def unacked(self) -> int:
        return self.written - self.acked


def make_tracker(stream: FakeStream, conn: FakeConn, declared: float | None = 20.0) -> DrainTracker:
    return DrainTracker(stream, S, declared=declared, default_rate=stream.rate, unacked=conn.unacked,
                        written_bytes=lambda: conn.written, now=0.0)


def test_tracker_maps_acknowledged_bytes_to_tokens_and_follows_the_client():
    st, conn = FakeStream(20.0), FakeConn()
    tr = make_tracker(st, conn)
    event = 200
    t, sent, read = 0.0, 0, 0.0
    while t < 12:
        # the gateway sends at the stream's current rate; the client reads 5 tok/s, acks in steps of 5 events
        while sent < int(st.rate * t + 1e-9) + 1:
            sent += 1
            conn.written += event
            tr.on_write(sent)
        read = 5.0 * t
        conn.acked = min(conn.written, int(read // 5) * 5 * event)
        tr.sample(t)
        t += 0.1
    assert tr.acked_tokens == int(read // 5) * 5
    assert tr.measured_rate == pytest.approx(5.0, rel=0.1)
    assert st.rate == pytest.approx(5.0, rel=0.1)
    assert tr.source == "measured" and not tr.stalled
    assert tr.consumed(t, model_consumed=sent) == tr.acked_tokens  # the evidence, not the send schedule
    assert tr.consumed(t, model_consumed=3) == 3  # never more than the reader model allows


def test_tracker_stall_floor_and_recovery():
    st, conn = FakeStream(10.0), FakeConn()
    tr = make_tracker(st, conn, declared=10.0)
    t, sent = 0.0, 0

    def step(reading: bool) -> None:
        nonlocal t, sent
        sent += 1
        conn.written += 100
        tr.on_write(sent)
        if reading:
            conn.acked = max(conn.acked, conn.written - 300)  # reads, three events behind
        tr.sample(t)
        t += 0.1

    while t < 3:
        step(True)
    assert not tr.stalled
    stop = t
    while not tr.stalled:
        step(False)
        assert t - stop < 8
    assert t - stop <= S.stall_after_s + 0.5
    assert st.rate == S.min_rate and tr.source == "stalled" and tr.stalls == 1
    conn.acked = conn.written  # reads everything again
    tr.sample(t)
    assert not tr.stalled
    assert st.rate >= 5.0  # back at its previous pace, not at the floor


def test_tracker_progress_reports_are_exact():
    st, conn = FakeStream(3.0, pacing="none"), FakeConn()
    tr = make_tracker(st, conn, declared=3.0)
    for k in range(1, 101):
        conn.written += 150
        tr.on_write(k)
    conn.acked = conn.written  # a TTS pipeline reads its socket eagerly: the socket says nothing useful
    tr.sample(0.5)
    for i, n in enumerate((3, 6, 9, 12, 15, 18)):
        now = 1.0 + i
        tr.report(n, now)
        assert tr.consumed(now, model_consumed=100) == n  # exact at the report
    assert tr.measured_rate == pytest.approx(3.0)
    assert tr.source == "reported"
    # between reports it goes on at the measured rate, never past what was written
    assert tr.consumed(6.0 + 1.0, model_consumed=100) == 21
    assert tr.consumed(1000.0, model_consumed=100) == 100
    assert math.isfinite(st.rate)


def test_tracker_probes_a_client_that_keeps_up_to_the_cap_and_holds_it():
    st, conn = FakeStream(8.0), FakeConn()
    tr = make_tracker(st, conn, declared=None)
    t, sent = 0.0, 0
    while t < 30:
        sent += 1
        conn.written += 100
        tr.on_write(sent)
        conn.acked = conn.written  # reads everything at once
        tr.sample(t)
        t += 0.25
    rates = [r for _, r in st.changes]
    assert rates == sorted(rates) and rates[-1] == S.learn_max_rate  # probed up to learn_max_rate, then held
    assert all(b - a >= S.probe_after_s for (a, _), (b, _) in zip(st.changes, st.changes[1:]))
    assert st.changes[-1][0] < 15 and tr.source == "learned" and not tr.stalled


class FakeLoop:
    def time(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: object) -> None:
        return None


class FakeTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closing = False
        self.buffered = 0

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


class FakeWriter:
    output_size = 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIOCOUTQ is Linux only")
def test_attached_connection_counts_the_kernel_queue_and_the_transport_buffer():
    """A real socket: bytes the peer has not acknowledged (kernel send queue plus the transport's buffer) are not
    consumed; once the peer reads them they are; a closing transport yields no evidence."""
    ls = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(ls.getsockname())
    gw, _ = ls.accept()
    ls.close()
    with client, gw:
        gw.setblocking(False)
        st, transport, writer = FakeStream(20.0), FakeTransport(gw), FakeWriter()
        sampler = DrainSampler(FakeLoop(), S)  # type: ignore[arg-type]
        tr = sampler.attach(st, transport, writer, declared=20.0, default_rate=20.0, owner=None)  # type: ignore[arg-type]
        assert tr is not None and sampler.trackers == {"s1": tr}
        try:  # fill the socket: the peer does not read
            while True:
                writer.output_size += gw.send(b"x" * 1000)
        except BlockingIOError:
            pass
        tr.on_write(1)
        transport.buffered = 500  # and more waits in the transport
        writer.output_size += 500
        tr.on_write(2)
        tr.sample(1.0)
        assert tr.acked_tokens == 0 and 0 < tr.acked_bytes < writer.output_size - 500
        deadline = time.monotonic() + 5
        while tr.acked_bytes < writer.output_size and time.monotonic() < deadline:  # the peer reads
            try:
                client.recv(1 << 16, socket.MSG_DONTWAIT)
                if transport.buffered:  # the transport hands its buffer to the kernel as room opens
                    transport.buffered -= gw.send(b"x" * transport.buffered)
            except BlockingIOError:
                time.sleep(0.001)
            tr.sample(2.0)
        assert tr.acked_bytes == writer.output_size and tr.acked_tokens == 2
        transport.closing = True
        writer.output_size += 100
        tr.on_write(3)
        tr.sample(3.0)
        assert tr.acked_bytes == writer.output_size - 100 and tr.acked_tokens == 2  # no evidence while closing


async def test_rate_change_reschedules_a_paced_stream_at_once():
    """A stalled stream paced at the floor (next token in 10 s) is released promptly once its rate is
    restored: the pacing clock's old entry is dropped, not waited for."""
    import asyncio

    from gateway.api.sse import ChunkEncoder
    from gateway.streams.base import StreamSpec
    from gateway.streams.pacer import PacingClock
    from gateway.streams.stream import Stream

    loop = asyncio.get_running_loop()
    clock = PacingClock(loop)
    now = loop.time()
    spec = StreamSpec(id="s1", engine="e", model="m", kind="chat", rate=0.1, pacing="smooth", arrival_time=now,
                      max_tokens=None)
    s = Stream(spec, ChunkEncoder("chat", "s1", "m", 0), clock=clock)
    s.on_tokens("a", 1, now)
    s.on_tokens("b", 1, now)
    assert (await s.next_output()).count(b"data:") == 1  # the first token at once, the second due in 10 s
    s.set_rate(20.0, loop.time())
    out = await asyncio.wait_for(s.next_output(), timeout=2.0)
    assert b'"b"' in out and s.released_tokens == 2
    assert len(clock) <= 1  # the stale entry does not linger as live work
    clock.close()


def test_sampler_passes_are_sliced_and_each_connection_is_sampled_once_per_interval():
    """The sampler walks one slice of the connections per timer call (no callback walks them all), and over one
    interval every connection is sampled exactly once; a reconnect replaces the older tracker, a detach ends it."""
    from gateway.streams.drain import SLICES

    delays: list[float] = []

    class Loop(FakeLoop):
        def call_later(self, delay: float, callback: object) -> object:
            delays.append(delay)
            return object()  # a pending timer

    sampler = DrainSampler(Loop(), S)  # type: ignore[arg-type]
    counts: dict[str, int] = {}
    streams = []
    for i in range(23):
        st = FakeStream(20.0)
        st.id = f"s{i}"
        streams.append(st)
        tr = sampler.attach(st, FakeTransport(None), FakeWriter(), declared=20.0, default_rate=20.0, owner=None)  # type: ignore[arg-type]
        assert tr is not None
        tr.sample = lambda now, sid=st.id: counts.__setitem__(sid, counts.get(sid, 0) + 1)  # type: ignore[method-assign]
    assert delays == [S.sample_interval_s / SLICES]  # one timer, armed once
    per_call = []
    for _ in range(SLICES):
        before = sum(counts.values())
        sampler._tick()
        per_call.append(sum(counts.values()) - before)
    assert counts == {f"s{i}": 1 for i in range(23)} and sampler.samples == 1
    assert max(per_call) <= -(-23 // SLICES)  # spread evenly: at most ceil(23 / SLICES) per call
    # A reconnect of s0 replaces its tracker (sampled once per pass, not twice); a detach of s1 ends its sampling.
    new = sampler.attach(streams[0], FakeTransport(None), FakeWriter(), declared=20.0, default_rate=20.0, owner=None)  # type: ignore[arg-type]
    assert new is not None
    new.sample = lambda now: counts.__setitem__("s0", counts["s0"] + 1)  # type: ignore[method-assign]
    sampler.detach(streams[1], sampler.trackers["s1"])
    for _ in range(SLICES):
        sampler._tick()
    assert counts["s0"] == 2 and counts["s1"] == 1 and all(counts[f"s{i}"] == 2 for i in range(2, 23))
