"""The per-stream data path: pacing releases, the read-ahead bound on engine reads, and resumption replays.

The pacing clock is driven by hand (``release_due`` at chosen instants), so these tests need no waiting.
"""

from __future__ import annotations

import asyncio
import math
import re

from gateway.api.sse import ChunkEncoder
from gateway.streams.base import Pacing, StreamSpec
from gateway.streams.pacer import PacingClock
from gateway.streams.stream import Stream


def make_stream(clock: PacingClock, rate: float = 10.0, read_ahead_s: float = 1.0, pacing: Pacing = "smooth") -> Stream:
    spec = StreamSpec(id="s1", engine="e", model="m", kind="chat", rate=rate, pacing=pacing, arrival_time=0.0,
                      max_tokens=None)
    s = Stream(spec, ChunkEncoder("chat", "s1", "m", 0), clock=clock, read_ahead_s=read_ahead_s)
    s.attach()  # a client writer takes what is released (``complete`` once it has been handed the end)
    return s


def token_indexes(data: bytes) -> list[int]:
    """The ``id: <stream>:<index>`` of every event in ``data``."""
    return [int(m) for m in re.findall(rb"^id: s1:(\d+)$", data, re.M)]


def take(stream: Stream) -> bytes:
    out = b"".join(stream._out)
    stream._out.clear()
    return out


async def test_first_token_is_released_at_once_and_later_ones_at_the_readers_pace() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    s = make_stream(clock, rate=10.0)
    s.on_tokens(" a", 1, 100.0)
    assert token_indexes(take(s)) == [1]  # no clock tick in between: the reader was waiting for it
    s.on_tokens(" b", 1, 100.0)
    assert take(s) == b""  # due 0.1 s later, at the reader's pace
    assert math.isclose(s.release_due(100.05), 100.1) and take(s) == b""  # not yet: next due at 100.1
    s.release_due(100.1)
    assert token_indexes(take(s)) == [2]
    clock.close()


async def test_read_ahead_pauses_the_engine_reads_and_resumes_them_below_half() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    s = make_stream(clock, rate=10.0, read_ahead_s=1.0)  # pause above 10 unsent tokens, read again at <= 5
    calls: list[bool] = []
    assert s.flow is not None
    s.flow.connect(calls.append)
    t = 0.0
    for i in range(12):  # an engine far faster than the reader: 12 tokens at once
        s.on_tokens(f" t{i}", 1, t)
    assert calls == [True]  # paused once the 11th unsent token came
    released = token_indexes(take(s))
    while calls == [True]:
        t += 0.1
        s.release_due(t)
        released += token_indexes(take(s))
    assert calls == [True, False]
    assert s.reader.produced - s.released_tokens <= 5  # read again only once at most half is left
    while s.held_events:
        t += 0.1
        s.release_due(t)
        released += token_indexes(take(s))
    assert released == list(range(1, 13))  # every token once, in order
    clock.close()


async def test_no_read_ahead_bound_for_unpaced_streams_or_when_disabled() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    for s in (make_stream(clock, read_ahead_s=0.0), make_stream(clock, read_ahead_s=1.0, pacing="none")):
        assert s.flow is None  # the engine reader gets no pause switch (gateway/pump.py connects only a flow)
        for i in range(50):
            s.on_tokens(f" t{i}", 1, 0.0)
    clock.close()


def finished_stream(clock: PacingClock, n: int) -> Stream:
    """A stream at 10 tok/s whose engine made ``n`` tokens at t = 0 and finished."""
    s = make_stream(clock, rate=10.0)
    for i in range(n):
        s.on_tokens(f" t{i}", 1, 0.0)
    s.on_finished("stop", 3, None, 0.0)
    return s


async def test_resuming_a_finished_stream_replays_every_token_before_the_end() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    s = finished_stream(clock, 6)
    take(s)
    s.reattach(2, 10.0)  # the client had two tokens; the engine is done: replay 3..6, then the end
    assert not s.complete  # only the first replayed token left at once, not the end
    out = take(s)
    t = 10.0
    while not s.complete:
        t += 0.1
        s.release_due(t)
        out += take(s)
    assert token_indexes(out) == [3, 4, 5, 6, 6]  # the finish event carries the last index too
    assert b'"finish_reason":"stop"' in out.split(b"\n\n")[-2]
    clock.close()


async def test_a_read_of_several_deltas_gives_the_same_events_as_one_at_a_time() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    one, batch = make_stream(clock, rate=10.0), make_stream(clock, rate=10.0)
    deltas = [(i + 1, f" t{i}", None) for i in range(12)]
    for d in deltas[:3]:  # the first tokens, then two reads of several
        one.on_tokens(d[1], 1, 5.0)
    batch.on_deltas(deltas[:3], 5.0)
    for d in deltas[3:]:
        one.on_tokens(d[1], 1, 5.2)
    batch.on_deltas(deltas[3:8], 5.2)
    batch.on_deltas(deltas[5:], 5.2)  # overlapping the last read (a store replay): the known ones are skipped
    assert batch.deltas == one.deltas and batch.generated == one.generated == 12
    out_one, out_batch, t = take(one), take(batch), 5.2
    while one.held_events or batch.held_events:
        t += 0.05
        one.release_due(t)
        batch.release_due(t)
        out_one += take(one)
        out_batch += take(batch)
    assert out_batch == out_one and token_indexes(out_one) == list(range(1, 13))
    assert (batch.reader.consumed, batch.reader.stall_time) == (one.reader.consumed, one.reader.stall_time)
    clock.close()


def live_entry(clock: PacingClock, stream: Stream) -> float | None:
    """When the clock will next call ``stream`` (None: never)."""
    due = [d for d, seq, s in clock._heap if s is stream and seq == stream._clock_seq]
    return due[0] if due else None


async def test_a_rate_change_after_the_last_token_was_read_keeps_the_end_due() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    s = finished_stream(clock, 3)
    s.release_due(0.1)
    take(s)  # tokens 1 and 2 out; token 3 and the end are due at 0.2, the clock set for then
    # The drain sampler changes the rate just after the reader reached the last token, before the clock fired.
    s.set_rate(8.0, 0.205)
    assert live_entry(clock, s) is not None and live_entry(clock, s) <= 0.205
    s.release_due(0.205)
    assert token_indexes(take(s)) == [3, 3] and s.complete
    clock.close()
