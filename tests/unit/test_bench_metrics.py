"""Bench metrics on hand-computed cases."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from bench.cli import slowest_ttft_timeline
from bench.http import phase_changes, ttft_phases, write_phase_changes
from bench.metrics import (
    RequestRecord,
    andes_qoe,
    buffers_at_arrival,
    consumption_times,
    effective_tokens,
    percentile,
    rebuffer_time,
    summarize,
    token_weight,
)
from gateway.streams.reader import ReaderModel


@pytest.mark.parametrize(
    ("buffer", "weight"),
    [(0, 1.0), (10, 1.0), (12, 0.8), (15, 0.5), (19, 0.1), (20, 0.0), (35, 0.0)],
)
def test_token_weight_thresholds(buffer: float, weight: float) -> None:
    # L = 100: full weight up to 10 tokens buffered, linear down to 0 at 20.
    assert token_weight(buffer, 100) == pytest.approx(weight)


def test_effective_tokens_of_a_burst_delivery() -> None:
    # 20 tokens all delivered at t=0 to a 1 tok/s reader. The reader starts on token 0 at once (it is
    # consumed, as in the gateway's ReaderModel), so token j >= 1 finds j - 1 unread tokens.
    # L = 20, tau1 = 2, tau2 = 4 tokens: weight 1 for buffers 0..2 (j = 0..3), 0.5 for 3 (j = 4) -> 4.5.
    times = [0.0] * 20
    assert buffers_at_arrival(times, 1.0) == [0] + list(range(19))
    assert effective_tokens(times, 1.0) == pytest.approx(4.5)


def test_effective_tokens_when_generation_matches_reading() -> None:
    # One token per second to a 1 tok/s reader: the buffer never holds more than the token being read.
    times = [float(k) for k in range(50)]
    assert effective_tokens(times, 1.0) == pytest.approx(50.0)


def test_rebuffer_after_first_token_only() -> None:
    # Reader at 1 tok/s: token 0 at t=3 (waiting for the first token is TTFT, not a stall), token 1 at
    # t=4 (on time), token 2 at t=9: the reader waited from t=5 to t=9 -> 4 s.
    assert rebuffer_time([3.0, 4.0, 9.0], 1.0) == pytest.approx(4.0)
    assert rebuffer_time([0.0, 0.5, 1.0, 1.5], 1.0) == 0.0


def test_rebuffer_of_an_unfinished_request_counts_the_open_stall() -> None:
    assert rebuffer_time([0.0, 1.0], 1.0, end=10.0, finished=False) == pytest.approx(8.0)


def test_consumption_times_follow_the_reader_model() -> None:
    times = [0.0, 0.0, 0.0, 5.0, 5.1, 9.0]
    cons = consumption_times(times, 2.0)
    assert cons == pytest.approx([0.0, 0.5, 1.0, 5.0, 5.5, 9.0])
    # The reader model agrees: at t = 0.75 tokens 0 and 1 were read (0, 0.5), token 2 waits for t = 1.
    reader = ReaderModel(2.0)
    reader.on_tokens(3, 0.0)
    assert reader.buffer(0.75) == 1 and reader.buffer(1.0) == 0


def test_andes_qoe() -> None:
    # Delivered exactly as expected (TTFT target 1 s, then 1 tok/s): QoE 1.
    assert andes_qoe(0.0, [1.0 + k for k in range(10)], 1.0, 10, 1.0, 20.0) == pytest.approx(1.0)
    # All ten tokens 10 s late: the reading ends at 19 instead of 10 -> below 1.
    late = andes_qoe(0.0, [11.0 + k for k in range(10)], 1.0, 10, 1.0, 30.0)
    assert 0.0 < late < 0.6
    # Faster than the reader adds nothing beyond 1.
    assert andes_qoe(0.0, [0.0] * 10, 1.0, 10, 1.0, 5.0) == pytest.approx(1.0)


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))


def test_summarize_keys_and_values() -> None:
    a = RequestRecord("a", 0.0, 1.0, 10, 4, [1.0, 2.0, 3.0, 4.0], finished=True)
    b = RequestRecord("b", 0.0, 1.0, 10, 4, [3.0, 3.0, 3.0, 10.0], finished=True)
    m = summarize([a, b], preemptions=7, policy_preempts=5)
    for key in ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "effective_throughput_tps", "throughput_tps",
                "rebuffer_mean_s", "rebuffer_p99_s", "qoe_mean", "preemptions", "policy_preempts", "requests",
                "completed"):
        assert key in m
    assert m["requests"] == 2 and m["completed"] == 2 and m["preemptions"] == 7 and m["policy_preempts"] == 5
    assert m["ttft_mean_s"] == pytest.approx(2.0)
    assert m["duration_s"] == pytest.approx(10.0)
    assert m["throughput_tps"] == pytest.approx(0.8)
    # b: reads 3 at 3,4,5 then waits until 10 -> 4 s stall; a: none.
    assert m["rebuffer_mean_s"] == pytest.approx(2.0)
    # L = 4: tau1 = 0.4, tau2 = 0.8 tokens. a: all buffers 0 -> 4. b: buffers 0, 0, 1, 0 -> 3.
    assert m["effective_throughput_tps"] == pytest.approx(7 / 10)


def test_request_without_tokens_counts_censored_ttft() -> None:
    m = summarize([RequestRecord("x", 2.0, 1.0, 5, 5)], end=12.0)
    assert m["ttft_mean_s"] == pytest.approx(10.0) and m["completed"] == 0


def test_stalled_share_counts_readers_that_ran_dry() -> None:
    # a reads without a gap; b runs dry for 4 s; c has not started (not counted): half of the started stalled.
    a = RequestRecord("a", 0.0, 1.0, 10, 4, [1.0, 2.0, 3.0, 4.0], finished=True)
    b = RequestRecord("b", 0.0, 1.0, 10, 4, [3.0, 3.0, 3.0, 10.0], finished=True)
    c = RequestRecord("c", 0.0, 1.0, 10, 4, [])
    assert summarize([a, b, c])["stalled_share"] == pytest.approx(0.5)
    assert summarize([a])["stalled_share"] == 0.0


def test_ttft_phases_from_stream_samples() -> None:
    # Arrived at 1.0, first token at 4.1; the gateway listed it at 1.25 (not in the engine's state), held from
    # 1.5 to 3.0, in the engine's queue until 3.5, prefilling until its first token.
    rec = RequestRecord("r", 1.0, 10.0, 100, 10, [4.1, 4.2])
    samples = [(0.75, "gateway", 0), (1.25, "gateway", 0), (1.5, "held", 0), (2.5, "held", 0), (3.0, "waiting", 0),
               (3.5, "running", 0), (4.0, "running", 0), (4.5, "running", 2)]
    ph = ttft_phases(rec, samples)
    assert ph == pytest.approx({"accept": 0.25, "gateway": 0.25, "held": 1.5, "waiting": 0.5, "running": 0.6})
    assert sum(ph.values()) == pytest.approx(4.1 - 1.0)
    assert ttft_phases(RequestRecord("x", 0.0, 1.0, 1, 1, []), samples) == {}


def test_a_runs_stream_phases_keep_each_change_and_nothing_else(tmp_path) -> None:
    # The same request's samples: six phase changes kept (with the tokens by then), the repeats dropped; a request
    # the gateway never listed keeps its arrival and tokens, with no phases.
    rec = RequestRecord("r", 1.0, 10.0, 100, 10, [4.1, 4.2], stream_id="s1")
    samples = [(0.75, "gateway", 0), (1.25, "gateway", 0), (1.5, "held", 0), (2.5, "held", 0), (3.0, "waiting", 0),
               (3.5, "running", 0), (4.0, "running", 0), (4.5, "running", 2), (5.0, "held", 2), (5.5, "running", 2)]
    unseen = RequestRecord("u", 2.0, 5.0, 50, 5, [], stream_id="s2")
    out = phase_changes([rec, unseen], {"s1": samples})
    assert out[0]["phases"] == [[0.75, "gateway", 0], [1.5, "held", 0], [3.0, "waiting", 0], [3.5, "running", 0],
                                [5.0, "held", 2], [5.5, "running", 2]]
    assert (out[0]["first_token"], out[0]["tokens"], out[0]["arrival"]) == (4.1, 2, 1.0)
    assert out[1] == {"id": "u", "arrival": 2.0, "rate": 5.0, "prompt": 50, "first_token": None, "tokens": 0,
                      "phases": []}
    path = tmp_path / "run" / "stream-phases-tokenflow.json.gz"
    write_phase_changes(path, [rec, unseen], {"s1": samples})
    assert json.loads(gzip.decompress(path.read_bytes())) == out


def test_slowest_ttft_timeline_averages_the_slowest_share() -> None:
    recs = [RequestRecord(f"r{i}", 0.0, 1.0, 1, 1, [float(i + 1)]) for i in range(40)]
    phases = {f"r{i}": {"held": float(i), "running": 1.0} for i in range(40)}
    t = slowest_ttft_timeline(recs, phases)  # 5 % of 40: the two slowest, TTFT 39 and 40
    assert t == pytest.approx({"requests": 2.0, "ttft_s": 39.5, "held_s": 38.5, "running_s": 1.0})
