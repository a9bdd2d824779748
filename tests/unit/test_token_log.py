"""The compact token log: it reads back exactly what was appended, replays from any token count, and keeps
token ids only for deltas that had them."""

from __future__ import annotations

import asyncio
import sys

import orjson
import pytest

from gateway.api.sse import ChunkEncoder
from gateway.resume import continuation_body
from gateway.streams.base import StreamSpec
from gateway.streams.pacer import PacingClock
from gateway.streams.stream import Stream
from gateway.streams.tokens import TokenLog, tokens_in

# Multi-byte and astral text, an empty delta (tokens with no text: held-back bytes), multi-token deltas.
DELTAS = [(1, "Hello", None), (2, ", wörld", None), (4, " 日本語", None), (5, "", None), (6, " 😀", None),
          (9, " a b c", None), (10, "é", None), (11, "\n", None)]


def test_reads_back_what_was_appended_in_order() -> None:
    log = TokenLog()
    log.append(DELTAS[0])
    log.extend(DELTAS[1:4])
    for d in DELTAS[4:]:
        log.append(d)
    assert list(log) == DELTAS and log == DELTAS and len(log) == len(DELTAS)
    assert [log[i] for i in range(len(DELTAS))] == DELTAS
    assert log[-1] == DELTAS[-1] and log[-len(DELTAS)] == DELTAS[0]
    assert log[2:5] == DELTAS[2:5] and log[::3] == DELTAS[::3] and log[5:] == DELTAS[5:] and log[9:] == []
    assert log.tokens == tokens_in(log) == 11 and TokenLog().tokens == tokens_in(TokenLog()) == 0
    assert log.text() == "".join(d[1] for d in DELTAS)
    assert TokenLog(DELTAS) == log and TokenLog(DELTAS[:-1]) != log
    with pytest.raises(IndexError):
        log[len(DELTAS)]
    with pytest.raises(IndexError):
        TokenLog()[-1]


@pytest.mark.parametrize("after", range(0, 13))
def test_replays_from_any_token_count(after: int) -> None:
    log = TokenLog(DELTAS)
    expected, prev = [], 0
    for d in DELTAS:
        if d[0] > after:
            expected.append((prev, d))
        prev = d[0]
    assert list(log.since(after)) == expected


def test_token_ids_only_for_the_deltas_that_had_them() -> None:
    log = TokenLog([(1, "a", None), (2, "b", None)])
    assert log._ids is None  # nothing allocated for ids until an engine gives them
    log.extend([(4, "cd", [30, 40]), (5, "", None), (6, "e", [60]), (7, "f", [])])
    log.append((8, "g", [80]))
    assert list(log) == [(1, "a", None), (2, "b", None), (4, "cd", [30, 40]), (5, "", None), (6, "e", [60]),
                         (7, "f", []), (8, "g", [80])]
    assert [d for _, d in log.since(4)] == list(log)[3:]
    big = 2**40  # ids are not bounded to 32 bits
    assert TokenLog([(1, "x", [big])])[0] == (1, "x", [big])


def test_a_token_id_prompt_continues_with_the_logged_ids() -> None:
    body = {"model": "m", "prompt": [1, 2], "max_tokens": 10}
    assert continuation_body("completion", body, TokenLog([(2, "ab", [7, 8]), (3, "c", [9])]))["prompt"] == [
        1, 2, 7, 8, 9]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    out = continuation_body("chat", chat, TokenLog(DELTAS))
    assert out["messages"][-1] == {"role": "assistant", "content": "".join(d[1] for d in DELTAS)}
    assert out["max_tokens"] == 20 - 11


def test_smaller_than_a_list_of_tuples() -> None:
    deltas = [(i + 300, f" tok{i}", None) for i in range(500)]
    log = TokenLog(deltas)
    as_list = (sys.getsizeof(deltas) + sum(sys.getsizeof(d) + sys.getsizeof(d[0]) + sys.getsizeof(d[1])
                                           for d in deltas))
    compact = sys.getsizeof(log._text) + sys.getsizeof(log._offs) + sys.getsizeof(log._ends)
    assert compact * 8 < as_list, (compact, as_list)


async def test_a_resumed_stream_replays_unicode_and_empty_deltas_exactly() -> None:
    clock = PacingClock(asyncio.get_running_loop())
    spec = StreamSpec(id="s1", engine="e", model="m", kind="chat", rate=1000.0, pacing="smooth", arrival_time=0.0,
                      max_tokens=None)
    s = Stream(spec, ChunkEncoder("chat", "s1", "m", 0), clock=clock)
    s.restore(DELTAS[:6], None)
    s.on_deltas(DELTAS[4:], 1.0)  # overlapping what it has: only the new ones are logged
    assert s.deltas == DELTAS and s.generated == 11
    for after in (0, 3, 4, 5, 9, 11):
        s.reattach(after, 2.0)
        t, out = 2.0, b""
        while s.held_events:
            t += 1.0
            s.release_due(t)
            out += b"".join(s._out)
            s._out.clear()
        out += b"".join(s._out)
        s._out.clear()
        events = [e for e in out.split(b"\n\n") if e.startswith(b"id: ")]
        ids = [int(e.split(b"\n", 1)[0].rsplit(b":", 1)[1]) for e in events]
        texts = [orjson.loads(e.split(b"data: ", 1)[1])["choices"][0]["delta"].get("content") for e in events]
        new = [d for d in DELTAS if d[0] > after]
        assert ids == [d[0] for d in new], after
        assert texts == [d[1] for d in new], after
    clock.close()
