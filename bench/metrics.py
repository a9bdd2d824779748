"""Per-policy metrics from what each simulated client saw: when each of its tokens became available.

Every client is replayed through the gateway's own :class:`ReaderModel` (a person reading at the
request's rate), so buffers and stalls are exactly the gateway's model:

* TTFT: first token time minus arrival. A request that never got a token counts with the time it had
  waited when the run ended (censored, not dropped).
* Effective throughput (TokenFlow paper, section 7.1.3): token ``j`` of request ``i`` weighs 1 if the
  reader's buffer when it arrived was at most 10% of the request's output length ``L_i``, falls linearly
  to 0 at 20%, and 0 beyond; the sum over all tokens divided by the run's duration.
* Raw throughput: tokens delivered divided by the run's duration (first arrival to last token).
* Rebuffer: time a reader spent with an empty buffer after its first token, before the last one.
* QoE (Andes v1): digested area over expected area, where the expected reader starts ``ttft_target_s``
  after arrival and reads at the rate; capped at 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.streams.reader import ReaderModel

TAU1 = 0.10  # buffer share of L_i below which a token counts fully
TAU2 = 0.20  # share at and beyond which it counts nothing


@dataclass(slots=True)
class RequestRecord:
    id: str
    arrival: float  # seconds, run clock
    rate: float
    prompt_tokens: int
    max_tokens: int
    token_times: list[float] = field(default_factory=list)  # when each token reached the client
    finished: bool = False
    error: str | None = None
    stream_id: str | None = None  # the gateway's stream id (X-TokenFlow-Stream-Id), when known


def token_weight(buffer_tokens: float, output_len: int) -> float:
    """The effective-throughput weight of one token that arrived with ``buffer_tokens`` unread."""
    lo, hi = TAU1 * output_len, TAU2 * output_len
    if buffer_tokens <= lo:
        return 1.0
    if buffer_tokens >= hi:
        return 0.0
    return (hi - buffer_tokens) / (hi - lo)


def buffers_at_arrival(token_times: list[float], rate: float) -> list[int]:
    """Unread tokens in the reader's buffer just before each token arrived."""
    reader = ReaderModel(rate)
    out = []
    for t in token_times:
        out.append(reader.buffer(t))
        reader.on_tokens(1, t)
    return out


def effective_tokens(token_times: list[float], rate: float) -> float:
    n = len(token_times)
    return sum(token_weight(b, n) for b in buffers_at_arrival(token_times, rate))


STALL_MIN_S = 0.1  # a reader's total stall below this (scheduling jitter) does not count it as stalled


def rebuffer_time(token_times: list[float], rate: float, end: float | None = None, finished: bool = True) -> float:
    """Stall time after the first token. For an unfinished request, a stall still open at ``end`` counts."""
    if not token_times:
        return 0.0
    reader = ReaderModel(rate)
    for t in token_times:
        reader.on_tokens(1, t)
    if finished or end is None:
        return reader.stall_time
    return reader.stall_time_at(end)


def consumption_times(token_times: list[float], rate: float) -> list[float]:
    """When the reader reads each token: c_k = max(a_k, c_{k-1} + 1/rate) (ReaderModel's rule)."""
    out: list[float] = []
    prev = -math.inf
    gap = 1.0 / rate
    for a in token_times:
        c = a if a > prev + gap else prev + gap
        out.append(c)
        prev = c
    return out


def stall_intervals(token_times: list[float], rate: float, end: float | None = None,
                    finished: bool = True) -> list[tuple[float, float]]:
    """When the reader had read everything and waited, after its first token: ``(start, stop)`` of each stall.
    An unfinished request's stall still open at ``end`` ends there. Their lengths add up to :func:`rebuffer_time`."""
    out: list[tuple[float, float]] = []
    if not token_times:
        return out
    gap = 1.0 / rate
    read = token_times[0]
    for a in token_times[1:]:
        due = read + gap
        if a > due + 1e-9:
            out.append((due, a))
        read = a if a > due else due
    if not finished and end is not None and end > read + gap:
        out.append((read + gap, end))
    return out


def andes_qoe(
    arrival: float, token_times: list[float], rate: float, expected_len: int, ttft_target_s: float, end: float,
    finished: bool = True,
) -> float:
    """Andes v1 QoE: area under the actual digestion curve over the area under the expected one, both
    up to the time the last token was read (``end`` if the request did not finish)."""
    cons = consumption_times(token_times, rate)
    horizon = cons[-1] if (finished and cons) else max(end, cons[-1] if cons else end)
    actual = sum(horizon - c for c in cons)
    t0 = arrival + ttft_target_s
    gap = 1.0 / rate
    expected = 0.0
    for k in range(expected_len):
        e = t0 + k * gap
        if e >= horizon:
            break
        expected += horizon - e
    if expected <= 0:
        return 1.0
    return min(1.0, actual / expected)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(
    records: Iterable[RequestRecord],
    *,
    start: float = 0.0,
    end: float | None = None,
    preemptions: int | None = None,
    policy_preempts: int | None = None,
    ttft_target_s: float = 1.0,
) -> dict[str, Any]:
    """The report's per-policy metrics. ``preemptions``: the engine's count over the run (the ones the policy
    ordered and the engine's own, when its KV ran out); ``policy_preempts``: the policy's preempt decisions."""
    recs = list(records)
    last = max((r.token_times[-1] for r in recs if r.token_times), default=start)
    end = last if end is None else max(end, last)
    duration = max(end - start, 1e-9)
    ttfts, rebuffers, qoes = [], [], []
    tokens = 0
    eff = 0.0
    for r in recs:
        tt = r.token_times
        ttfts.append((tt[0] if tt else end) - r.arrival)
        qoes.append(andes_qoe(r.arrival, tt, r.rate, max(r.max_tokens, len(tt)), ttft_target_s, end, r.finished))
        if not tt:
            continue
        tokens += len(tt)
        eff += effective_tokens(tt, r.rate)
        rebuffers.append(rebuffer_time(tt, r.rate, end, r.finished))
    return {
        "requests": len(recs),
        "completed": sum(1 for r in recs if r.finished),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "effective_throughput_tps": eff / duration,
        "throughput_tps": tokens / duration,
        "rebuffer_mean_s": _mean(rebuffers),
        "rebuffer_p99_s": percentile(rebuffers, 99),
        # share of the streams that started whose reader ran dry for more than STALL_MIN_S in all
        "stalled_share": (sum(1 for x in rebuffers if x > STALL_MIN_S) / len(rebuffers)) if rebuffers else 0.0,
        "qoe_mean": _mean(qoes),
        "preemptions": preemptions,
        "policy_preempts": policy_preempts,
        "tokens": tokens,
        "effective_tokens": eff,
        "duration_s": duration,
    }


def time_series(records: Iterable[RequestRecord], bin_s: float, start: float = 0.0) -> dict[str, list[float]]:
    """Throughput and effective throughput per time bin (tokens/s), for the plots."""
    recs = list(records)
    last = max((r.token_times[-1] for r in recs if r.token_times), default=start)
    nbins = max(1, math.ceil((last - start) / bin_s) + 1)
    raw = [0.0] * nbins
    eff = [0.0] * nbins
    for r in recs:
        n = len(r.token_times)
        for t, b in zip(r.token_times, buffers_at_arrival(r.token_times, r.rate)):
            k = int((t - start) / bin_s)
            raw[k] += 1.0
            eff[k] += token_weight(b, n)
    return {
        "t": [start + (k + 0.5) * bin_s for k in range(nbins)],
        "throughput_tps": [x / bin_s for x in raw],
        "effective_throughput_tps": [x / bin_s for x in eff],
    }


def buffer_trace(record: RequestRecord, step_s: float) -> tuple[list[float], list[int]]:
    """A reader's buffer sampled every ``step_s`` from arrival to its last token."""
    if not record.token_times:
        return [], []
    reader = ReaderModel(record.rate)
    ts, bs = [], []
    times = record.token_times
    j = 0
    t = record.arrival
    stop = times[-1] + step_s
    while t <= stop:
        while j < len(times) and times[j] <= t:
            reader.on_tokens(1, times[j])
            j += 1
        ts.append(t)
        bs.append(reader.buffer(t))
        t += step_s
    return ts, bs
