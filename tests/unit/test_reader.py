import math

import pytest

from gateway.streams.reader import ReaderModel


def test_first_token_consumed_at_once_then_one_per_interval():
    r = ReaderModel(rate=10.0)
    r.on_tokens(50, now=1.0)  # a burst: 50 tokens at t=1
    assert r.buffer(1.0) == 49  # the first is read immediately
    assert r.buffer(1.05) == 49
    assert r.buffer(1.1) == 48
    assert r.buffer(2.0) == 39  # 11 read by t=2 (t=1.0, 1.1, ..., 2.0)
    assert r.time_to_empty(2.0) == pytest.approx(3.9, abs=1e-9)
    assert r.stall_time == 0


def test_slow_producer_counts_stalls():
    r = ReaderModel(rate=10.0)
    r.on_tokens(1, now=0.0)
    # The reader wants token 2 at t=0.1; it arrives at t=0.5: a 0.4 s stall.
    r.on_tokens(1, now=0.5)
    assert r.stall_time == pytest.approx(0.4)
    assert r.stalls == 1
    assert r.buffer(0.5) == 0
    # A stall in progress is visible before the next token arrives.
    assert r.stall_time_at(1.0) == pytest.approx(0.4 + 0.4)


def test_no_stall_once_finished():
    r = ReaderModel(rate=5.0)
    r.on_tokens(3, now=0.0)
    r.finished = True
    assert r.stall_time_at(10.0) == 0.0
    assert r.buffer(10.0) == 0


def test_due_time_and_rate_change():
    r = ReaderModel(rate=4.0)
    assert r.due_time() == math.inf
    r.on_tokens(10, now=0.0)
    assert r.due_time() == pytest.approx(0.25)
    r.set_rate(2.0, now=0.3)  # token 2 was read at 0.25; the next one now comes 0.5 s after it
    assert r.due_time() == pytest.approx(0.75)


def test_rejects_bad_rate():
    with pytest.raises(ValueError):
        ReaderModel(0)
