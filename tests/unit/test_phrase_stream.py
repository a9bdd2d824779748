"""``pacing: "phrase"``: whole phrases, one event each, released when the listener reaches their first token.

The pacing clock is driven by hand (``release_due`` at chosen instants), as in test_stream.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest

from gateway.api.sse import ChunkEncoder
from gateway.streams.base import StreamSpec
from gateway.streams.pacer import PacingClock
from gateway.streams.phrase_stream import MAX_WORDS, PhraseStream, stream_class
from gateway.streams.stream import Stream

from .test_stream import live_entry


@pytest.fixture
async def clock():
    c = PacingClock(asyncio.get_running_loop())
    yield c
    c.close()


def make(clock: PacingClock, rate: float = 10.0, read_ahead_s: float = 0.0) -> PhraseStream:
    spec = StreamSpec(id="s1", engine="e", model="m", kind="chat", rate=rate, pacing="phrase", arrival_time=0.0,
                      max_tokens=None)
    s = PhraseStream(spec, ChunkEncoder("chat", "s1", "m", 0), clock=clock, read_ahead_s=read_ahead_s)
    s.attach()  # a client writer takes what is released (``complete`` once it has been handed the end)
    return s


def events(stream: Stream) -> list[tuple[int, str | None]]:
    """(id index, text or None for the finish event) of every released event, taken from the stream."""
    data = b"".join(stream._out)
    stream._out.clear()
    out = []
    for block in data.split(b"\n\n"):
        m = re.match(rb"id: s1:(\d+)\ndata: (.*)", block, re.S)
        if m:
            choice = json.loads(m.group(2))["choices"][0]
            out.append((int(m.group(1)), choice["delta"].get("content") if not choice["finish_reason"] else None))
    return out


def words(n: int, start: int = 0) -> str:
    return "".join(f" tok{i}" for i in range(start, start + n))


def test_the_class_follows_the_pacing():
    assert stream_class("phrase") is PhraseStream
    assert stream_class("smooth") is Stream and stream_class("none") is Stream


async def test_each_phrase_is_one_event_released_one_phrase_ahead_of_the_listener(clock):
    s = make(clock, rate=10.0)
    for i in range(20):  # an engine far ahead of its listener: the whole answer at t = 0
        s.on_tokens(f" tok{i}", 1, 0.0)
    s.on_finished("stop", 3, None, 0.0)
    # The first word leaves at once (the listener is waiting for it), and with it the phrase that follows:
    # the synthesizer holds the next phrase while it speaks one.
    assert events(s) == [(1, " tok0"), (1 + MAX_WORDS, words(MAX_WORDS, 1))]
    assert math.isclose(s.release_due(0.05), 0.1) and events(s) == []
    s.release_due(0.1)  # the listener starts the second phrase (token 2): the third leaves
    assert events(s) == [(1 + 2 * MAX_WORDS, words(MAX_WORDS, 1 + MAX_WORDS))]
    t, out, times = s.release_due(0.1), [], []
    while not s.complete:
        times.append(t)
        t = s.release_due(t)
        out += events(s)
    assert out == [(20, words(20 - 1 - 2 * MAX_WORDS, 1 + 2 * MAX_WORDS)), (20, None)]
    # The last phrase when the listener starts the one before it (token 10); the end once it has heard it all.
    assert [round(x, 6) for x in times] == [0.9, 1.9]


async def test_a_word_in_several_tokens_is_never_split(clock):
    s = make(clock, rate=10.0)
    deltas = [" Hel", "lo", ",", " wor", "ld", " and", " more", "."]
    for d in deltas:
        s.on_tokens(d, 1, 0.0)
    s.on_finished("stop", 3, None, 0.0)
    t, out = 0.0, events(s)
    while not s.complete:
        t = s.release_due(t)
        out += events(s)
    texts = [text for _, text in out if text is not None]
    assert texts == [" Hello,", " world and more."]
    assert [n for n, _ in out] == [3, 8, 8]


async def test_an_engine_slower_than_its_listener_gets_whole_words_as_they_complete(clock):
    s = make(clock, rate=10.0)
    out = []
    t = 0.0
    for d in [" A", " se", "cond", " wo", "rd"]:  # one token every 0.5 s: the listener waits for each
        s.on_tokens(d, 1, t)
        s.release_due(t)
        out += [(round(t, 1), text) for _, text in events(s)]
        t += 0.5
    s.on_finished("stop", 3, None, t)
    out += [(round(t, 1), text) for _, text in events(s)]
    assert out == [(0.5, " A"), (1.5, " second"), (2.5, " word"), (2.5, None)]


async def test_read_ahead_counts_whole_phrases_and_an_open_phrase_never_blocks_reading(clock):
    s = make(clock, rate=2.0, read_ahead_s=1.0)  # bound: 2 unsent tokens, far less than a phrase
    calls: list[bool] = []
    assert s.flow is not None
    s.flow.connect(calls.append)
    for i in range(1 + MAX_WORDS + MAX_WORDS):  # the first word and one phrase leave; a second one is open
        s.on_tokens(f" tok{i}", 1, 0.0)
    assert calls == []  # an incomplete phrase does not stop the reading (it needs the next token)
    assert [n for n, _ in events(s)] == [1, 1 + MAX_WORDS]
    s.on_tokens(f" tok{1 + 2 * MAX_WORDS}", 1, 0.0)  # completes it: held for the listener, more than 2 unsent
    assert calls == [True]
    t, released = 0.0, []
    while calls == [True]:
        t = s.release_due(t)
        released += [n for n, _ in events(s)]
    assert calls == [True, False] and released == [1 + 2 * MAX_WORDS]  # read again once it left
    assert t == math.inf or t > 0  # nothing else is due


async def test_resuming_replays_from_where_the_client_was_in_phrases(clock):
    s = make(clock, rate=10.0)
    for i in range(12):
        s.on_tokens(f" tok{i}", 1, 0.0)
    s.on_finished("stop", 3, None, 0.0)
    events(s)
    s.reattach(3, 10.0)  # the client had 3 tokens
    t, out = 10.0, events(s)
    while not s.complete:
        t = s.release_due(t)
        out += events(s)
    assert "".join(text for _, text in out if text) == words(9, 3)
    assert [n for n, _ in out][-1] == 12 and all(text is None or text.startswith(" tok") for _, text in out)


async def test_the_buffer_counts_whole_phrases_only(clock):
    """The policy sees what the listener can be given: an open phrase needs the engine to go on first."""
    s = make(clock, rate=10.0)
    for i in range(1 + MAX_WORDS + 3):  # the first word, a whole phrase, and three words of an open one
        s.on_tokens(f" tok{i}", 1, 0.0)
    assert s.reader.buffer(0.0) == MAX_WORDS + 3  # the reader model counts every token made
    assert s.buffer_tokens(0.0) == MAX_WORDS  # ... the listener can only be given the whole phrase
    s.on_finished("stop", 3, None, 0.0)  # the end closes the open phrase: it counts now
    assert s.buffer_tokens(0.0) == MAX_WORDS + 3


async def test_a_rate_change_moves_the_next_release_and_never_loses_the_end(clock):
    s = make(clock, rate=10.0)
    for i in range(1 + 2 * MAX_WORDS):
        s.on_tokens(f" tok{i}", 1, 0.0)
    s.on_finished("stop", 3, None, 0.0)
    events(s)  # the first word and the next phrase left at once; the third phrase is due at 0.1
    s.set_rate(5.0, 0.05)  # the listener is slower than declared: token 2 is reached at 0.2
    assert live_entry(clock, s) == pytest.approx(0.2)
    s.release_due(0.2)
    assert events(s) == [(1 + 2 * MAX_WORDS, words(MAX_WORDS, 1 + MAX_WORDS))]
    s.set_rate(4.0, 0.3)  # the clock is set for the next release (the end, when token 17 is heard), not token 3
    due = live_entry(clock, s)
    assert due == pytest.approx(0.45 + 14 / 4.0)  # token 3 is heard at 0.2 + 1/4 s, token 17 14 tokens later
    t, out = due, []
    while not s.complete:
        nxt = s.release_due(t)
        out += events(s)
        if s.complete:
            break
        s.set_rate(4.0, nxt)  # a rate change right when the next event is due: it goes at once
        out += events(s)
        live = live_entry(clock, s)
        assert s.complete or (live is not None and live < math.inf), "the stream would never be released again"
        t = live if live is not None else t
    assert out == [(1 + 2 * MAX_WORDS, None)]
