"""The demo page's burst: N simulated users arrive at once on every engine, each engine under its own policy.

The users are HTTP clients of this gateway's public API (:func:`bench.http.stream_client`: ``/v1/completions``
unpaced, every token's arrival time recorded). Each reads at its declared rate, modelled by the gateway's own
reader model (:mod:`bench.metrics`), so its wait for the first token (TTFT) and its stalls are what a person
reading at that rate would see. Every engine gets the same users (same seed): the lanes differ only by policy.

:func:`lane_view` is pure (records and a time in, the page's summary out); :class:`Burst` runs the clients.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.http import stream_client
from bench.metrics import RequestRecord, consumption_times, percentile, stall_intervals
from bench.workload import RequestSpec, WorkloadConfig, generate

# What a person reads at (tokens/s), as in the HTTP benchmark: 40% at 15, 60% at 20.
READER_RATES = ((15.0, 0.4), (20.0, 0.6))
PROMPT_TOKENS = 256


@dataclass(frozen=True, slots=True)
class BurstSettings:
    users: int
    output_tokens: int = 200
    seed: int = 1

    def specs(self) -> list[RequestSpec]:
        return generate(WorkloadConfig(kind="burst", n=self.users, input_mean=PROMPT_TOKENS,
                                       output_mean=self.output_tokens, rates=READER_RATES, seed=self.seed))


@dataclass(slots=True)
class Lane:
    engine: str
    policy: str
    model: str
    records: list[RequestRecord]


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 3)


def lane_view(lane: Lane, now: float, running: bool) -> dict[str, Any]:
    """What the page draws for one lane at ``now`` (seconds since the burst started).

    ``rows``: one per user, ``[ttft, read_until, tokens, max_tokens, stalls, finished]``: ``ttft`` is None while it
    waits (its wait so far counts in the TTFT figures: censored, not dropped), ``read_until`` is when the reader
    reaches its last token so far, ``stalls`` the ``[start, stop]`` of every stall.
    """
    rows: list[list[Any]] = []
    ttfts: list[float] = []
    stall_total = 0.0
    stalled_users = errors = started = finished = 0  # finished: the whole answer arrived
    for rec in lane.records:
        times = rec.token_times
        done = rec.finished or rec.error is not None or not running
        if rec.error is not None:
            errors += 1
        if not times:
            ttfts.append(now - rec.arrival)
            rows.append([None, None, 0, rec.max_tokens, [], done])
            continue
        started += 1
        ttfts.append(times[0] - rec.arrival)
        read_until = consumption_times(times, rec.rate)[-1]
        stalls = stall_intervals(times, rec.rate, end=now, finished=done)
        lost = sum(b - a for a, b in stalls)
        stall_total += lost
        stalled_users += lost > 0
        finished += rec.finished
        rows.append([_r(times[0]), _r(read_until), len(times), rec.max_tokens,
                     [[_r(a), _r(b)] for a, b in stalls], done])
    return {
        "engine": lane.engine,
        "policy": lane.policy,
        "model": lane.model,
        "users": len(lane.records),
        "started": started,
        "finished": finished,
        "errors": errors,
        "ttft_p50_s": _r(percentile(ttfts, 50)),
        "ttft_p99_s": _r(percentile(ttfts, 99)),
        "ttft_max_s": _r(max(ttfts, default=math.nan)),
        "stall_s": round(stall_total, 3),
        "stalled_users": stalled_users,
        "rows": rows,
    }


class Burst:
    """One burst on every lane at once; :meth:`view` may be called while it runs."""

    def __init__(self, settings: BurstSettings, lanes: list[tuple[str, str, str]], started_at: float) -> None:
        self.settings = settings
        specs = settings.specs()
        self._specs = specs
        self.lanes = [Lane(engine, policy, model,
                           [RequestRecord(s.id, 0.0, s.rate, s.prompt_tokens, s.output_tokens) for s in specs])
                      for engine, policy, model in lanes]
        self.t0 = started_at
        self.ended_at: float | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self.ended_at is None

    async def run(self, url: str, headers: dict[str, str], timeout_s: float) -> None:
        """Every user of every lane, against ``url``; ends when all have their answers (or at ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        conn = aiohttp.TCPConnector(limit=0)
        try:
            async with aiohttp.ClientSession(connector=conn, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                await asyncio.gather(*(
                    stream_client(session, url, lane.model, spec, self.t0, rec=rec)
                    for lane in self.lanes for spec, rec in zip(self._specs, lane.records)
                ))
        except Exception as e:  # noqa: BLE001 - the page shows it; the gateway goes on
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended_at = loop.time()

    def view(self, now: float) -> dict[str, Any]:
        t = (self.ended_at if self.ended_at is not None else now) - self.t0
        return {
            "status": "running" if self.running else ("failed" if self.error else "done"),
            "error": self.error,
            "users": self.settings.users,
            "output_tokens": self.settings.output_tokens,
            "elapsed_s": round(max(0.0, t), 3),
            "lanes": [lane_view(lane, max(0.0, t), self.running) for lane in self.lanes],
        }
