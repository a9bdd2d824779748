"""The burst's per-lane summary (pure) and the stall intervals it draws."""

from __future__ import annotations

import pytest

from bench.metrics import RequestRecord, rebuffer_time, stall_intervals
from gateway.web.burst import Lane, lane_view


def test_stall_intervals_are_the_waits_of_a_reader_that_caught_up():
    # 10 tok/s: token 2 is wanted at 0.1 but arrives at 0.5; token 3 at 0.6 is on time; token 4 wanted at 0.7, came 1.0.
    times = [0.0, 0.5, 0.55, 1.0]
    stalls = stall_intervals(times, 10.0)
    assert stalls == [pytest.approx((0.1, 0.5)), pytest.approx((0.7, 1.0))]
    assert sum(b - a for a, b in stalls) == pytest.approx(rebuffer_time(times, 10.0))


def test_an_unfinished_answer_has_its_open_stall_end_now():
    times = [0.0, 0.1]
    assert stall_intervals(times, 10.0, end=0.15, finished=False) == []  # still reading token 2
    assert stall_intervals(times, 10.0, end=1.0, finished=False) == [pytest.approx((0.2, 1.0))]
    assert sum(b - a for a, b in stall_intervals(times, 10.0, end=1.0, finished=False)) == pytest.approx(
        rebuffer_time(times, 10.0, end=1.0, finished=False))
    assert stall_intervals([], 10.0, end=5.0, finished=False) == []


def _rec(i: int, times: list[float], n: int, finished: bool) -> RequestRecord:
    return RequestRecord(f"u{i}", 0.0, 10.0, 16, n, token_times=times, finished=finished)


def test_lane_view_counts_waiting_users_with_their_wait_so_far():
    lane = Lane("e", "fcfs", "m", [
        _rec(0, [0.2, 0.3, 0.4], 3, True),   # served at once, no stall
        _rec(1, [1.0, 1.1, 1.6], 3, True),   # served late, then stalls 0.4 s
        _rec(2, [], 3, False),               # still waiting at t = 2
    ])
    v = lane_view(lane, now=2.0, running=True)
    assert (v["users"], v["started"], v["finished"], v["errors"]) == (3, 2, 2, 0)
    assert v["ttft_p50_s"] == pytest.approx(1.0) and v["ttft_max_s"] == pytest.approx(2.0)  # censored at now
    assert v["stall_s"] == pytest.approx(0.4) and v["stalled_users"] == 1
    assert v["rows"][0] == [0.2, pytest.approx(0.4), 3, 3, [], True]
    assert v["rows"][1][4] == [[pytest.approx(1.2), pytest.approx(1.6)]]
    assert v["rows"][2] == [None, None, 0, 3, [], False]


def test_lane_view_of_an_ended_burst_has_no_open_stalls():
    lane = Lane("e", "tokenflow", "m", [_rec(0, [0.0, 0.1], 5, False)])  # cut short: the burst ended
    assert lane_view(lane, now=9.0, running=False)["rows"][0][4] == []
    assert lane_view(lane, now=9.0, running=True)["rows"][0][4] == [[pytest.approx(0.2), 9.0]]
