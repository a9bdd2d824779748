"""Failover: an engine killed (SIGKILL) or frozen (SIGSTOP) under load, with another engine of the same model up.

Real processes: two simulated engines, gateway replicas, a private redis-server. The simulated engine is
deterministic: token ``i`` of an answer is `` tok<i>``, and a continuation resumes the numbering after the last
token of its prompt. So every client can check its answer exactly: ``tok0 .. tok<max_tokens-1>``, each once, in
order, ending with ``finish_reason: length`` and the usage a single engine would have reported. Each case prints
its figures (the time from the failure to the first continued token). Waits are polls, never sleeps.
"""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from backends.sim.server import text_tokens
from tests.integration.replicas import Client, Cluster, Proc, RedisServer, lost_and_duplicated, poll
from tests.support.procs import free_port

pytestmark = pytest.mark.redis

_SHORT = aiohttp.ClientTimeout(total=5)
_NAMES = {"sim": "engine", "sim-b": "engine-b"}  # engine name -> its process in the cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    srv = RedisServer(tmp_path)
    srv.start()
    c = Cluster(tmp_path, srv.url)
    try:
        await c.start_engine()
        port = free_port()
        c.procs["engine-b"] = Proc("engine-b", [sys.executable, "-m", "backends.sim", "--profile", "sim-small",
                                                "--port", str(port)], c.logdir, url=f"http://127.0.0.1:{port}")
        c.procs["engine-b"].wait_http("/health", 30)
        yield c
    finally:
        for p in c.procs.values():
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGCONT)
        c.stop()
        srv.stop()


def _engines(cluster: Cluster) -> dict[str, str]:
    urls = [{"name": "sim", "url": cluster.engine_url, "models": ["sim-small"]},
            {"name": "sim-b", "url": cluster.procs["engine-b"].url, "models": ["sim-small"]}]
    return {"TOKENFLOW_ENGINES": orjson.dumps(urls).decode()}


def _client(i: int, max_tokens: int, rate: float = 1000.0, pacing: str = "none") -> Client:
    extra = {"stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
             "tokenflow": {"rate": rate, "pacing": pacing}}
    if i % 2:
        return Client({"model": "sim-small", "messages": [{"role": "user", "content": f"question {i}"}], **extra},
                      path="/v1/chat/completions")
    return Client({"model": "sim-small", "prompt": f"prompt number {i}", **extra})


def _prompt_tokens(c: Client) -> int:
    """What the simulated engine counts for the client's own prompt (one engine, no failover)."""
    if "prompt" in c.body:
        return text_tokens(c.body["prompt"])
    return sum(text_tokens(m["content"]) for m in c.body["messages"])


def _whole(c: Client, max_tokens: int) -> bool:
    """The answer a single engine would have given: every token once, in order, ended by the limit, right usage."""
    return (c.done and not c.errors and c.tokens() == list(range(max_tokens)) and c.finish_reasons == ["length"]
            and c.usage == {"prompt_tokens": _prompt_tokens(c), "completion_tokens": max_tokens,
                            "total_tokens": _prompt_tokens(c) + max_tokens})


def _moves(cluster: Cluster, replicas: list[str]) -> dict[str, int]:
    """Stream id -> tokens it had when it moved to another engine (the replicas' logs: the exact cut)."""
    out = {}
    for name in replicas:
        for line in cluster.procs[name].log.read_text(errors="replace").splitlines():
            if '"request moved to another engine"' in line:
                rec = orjson.loads(line)
                out[rec["stream_id"]] = rec["tokens"]
    return out


def _continued_at(c: Client, cut: int) -> float:
    """When the first token after ``cut`` (the first from the engine that took over) reached the client."""
    for text, stamp in zip(c.texts, c.stamps, strict=True):
        if cut in _indices(text):
            return stamp
    raise AssertionError(f"token {cut} never arrived")


def _indices(text: str) -> list[int]:
    return [int(m) for m in re.findall(r" tok(\d+)", text)]


async def _info(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url + "/v1/streams", timeout=_SHORT) as r:
        data: list[dict[str, Any]] = (await r.json())["data"]
        return data


async def _failovers(http: aiohttp.ClientSession, url: str, engine: str, outcome: str) -> float:
    async with http.get(url + "/metrics", timeout=_SHORT) as r:
        text = await r.text()
    key = f'tokenflow_failovers_total{{engine="{engine}",outcome="{outcome}"}} '
    return sum(float(line[len(key):]) for line in text.splitlines() if line.startswith(key))


async def _engine_requests(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url + "/control/v1/state", timeout=_SHORT) as r:
        reqs: list[dict[str, Any]] = (await r.json())["requests"]
        return reqs


async def _fail_engine_under_load(cluster: Cluster, urls: list[str], sig: signal.Signals, n: int = 50,
                                  max_tokens: int = 400) -> dict[str, Any]:
    """``n`` streams spread over ``urls`` (replicas) and both engines; ``sig`` to the engine serving the first
    stream (a slow reader that lives long enough to be looked up after it moved). Returns the figures."""
    watcher = _client(0, 200, rate=20, pacing="smooth")
    clients = [watcher] + [_client(i, max_tokens) for i in range(1, n)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        tasks = [asyncio.create_task(c.start(http, urls[i % len(urls)])) for i, c in enumerate(clients)]
        await poll(lambda: _all_have(clients, 10), 30, "every stream delivering")
        on: dict[str, tuple[str, str]] = {}  # stream id -> (engine, replica url)
        for url in urls:
            on |= {s["id"]: (s["engine"], url) for s in await _info(http, url)}
        victim, watcher_url = on[watcher.sid or ""]
        other = next(e for e in _NAMES if e != victim)
        moved = [c for c in clients if on.get(c.sid or "", ("",))[0] == victim]
        proc = cluster.procs[_NAMES[victim]]
        t_fail = time.monotonic()
        proc.popen.send_signal(sig)

        async def watcher_moved() -> bool:
            async with http.get(f"{watcher_url}/v1/streams/{watcher.sid}", timeout=_SHORT) as r:
                return r.status == 200 and (await r.json())["engine"] == other

        await poll(watcher_moved, 20, "GET /v1/streams/{id} shows the other engine")
        # New requests go to the engine still up, at once (the failed one is marked down by now).
        fresh = [_client(i, 20) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(c.start(http, urls[0]) for c in fresh)), 20)
        await asyncio.wait_for(asyncio.gather(*tasks), 90)
        continued = sum([await _failovers(http, u, victim, "continued") for u in urls])
        ended = sum([await _failovers(http, u, victim, "ended") for u in urls])
        if sig == signal.SIGSTOP:
            proc.popen.send_signal(signal.SIGCONT)
            # The thawed engine gets the aborts (or sees its connections closed): it keeps nothing.
            await poll(lambda: _empty(http, cluster.engine_url if victim == "sim" else proc.url), 20,
                       "nothing left on the thawed engine")
        survivor = cluster.engine_url if other == "sim" else cluster.procs["engine-b"].url
        await poll(lambda: _empty(http, survivor), 10, "nothing left on the other engine")
    lost, dup, disorder = lost_and_duplicated(clients[1:], max_tokens)
    lost_w, dup_w, disorder_w = lost_and_duplicated([watcher], 200)
    cuts = _moves(cluster, [n for n in cluster.procs if n in ("A", "B")])
    resumed = sorted(_continued_at(c, cuts[c.sid or ""]) - t_fail for c in moved if c is not watcher)
    return {"clients": clients, "max_tokens": max_tokens, "moved": moved, "continued": continued, "ended": ended,
            "lost": lost + lost_w, "dup": dup + dup_w, "disorder": disorder + disorder_w, "resumed": resumed,
            "fresh": fresh, "watcher": watcher}


async def _empty(http: aiohttp.ClientSession, url: str) -> bool:
    return not await _engine_requests(http, url)


async def _all_have(clients: list[Client], n: int) -> bool:
    return all(len(c.tokens()) >= n for c in clients)


def _check(r: dict[str, Any], what: str) -> None:
    clients, moved, resumed = r["clients"], r["moved"], r["resumed"]
    # The continuations queue in the surviving engine like any request: those beyond its free sequence slots
    # (sim-small: 32) wait for its own streams to finish, so the spread says more about capacity than failover.
    quick = sum(1 for t in resumed if t < resumed[0] + 0.5)
    print(f"\n{what}: {len(moved)} of {len(clients)} streams on it moved to the other engine; failure -> first "
          f"continued token: fastest {resumed[0] * 1000:.0f} ms ({quick} of {len(resumed)} within 0.5 s of it), "
          f"median {statistics.median(resumed) * 1000:.0f} ms, max {max(resumed) * 1000:.0f} ms; "
          f"lost = {r['lost']}, duplicated = {r['dup']}, out of order = {r['disorder']}")
    assert len(moved) >= 2 and r["continued"] == len(moved) and r["ended"] == 0
    assert (r["lost"], r["dup"], r["disorder"]) == (0, 0, 0)
    assert all(_whole(c, r["max_tokens"]) for c in clients[1:]), [
        (c.errors, c.finish_reasons, c.usage, len(c.tokens())) for c in clients if not _whole(c, r["max_tokens"])][:3]
    assert _whole(r["watcher"], 200)
    assert all(_whole(c, 20) for c in r["fresh"])


async def test_engine_killed_streams_continue_on_the_other_engine(cluster: Cluster) -> None:
    url = await cluster.start_gateway("A", env_extra=_engines(cluster))
    _check(await _fail_engine_under_load(cluster, [url], signal.SIGKILL), "engine SIGKILLed under 50 streams")


async def test_engine_frozen_streams_continue_on_the_other_engine(cluster: Cluster) -> None:
    url = await cluster.start_gateway("A", env_extra=_engines(cluster))
    r = await _fail_engine_under_load(cluster, [url], signal.SIGSTOP)
    _check(r, "engine SIGSTOPped under 50 streams (down_after_s 2)")
    assert min(r["resumed"]) >= 2.0  # judged by liveness (engines[].down_after_s), not by a gap between tokens


async def test_two_replicas_streams_of_both_continue_when_an_engine_dies(cluster: Cluster) -> None:
    env = _engines(cluster)
    a = await cluster.start_gateway("A", env_extra=env)
    b = await cluster.start_gateway("B", env_extra=env)
    r = await _fail_engine_under_load(cluster, [a, b], signal.SIGKILL)
    _check(r, "engine SIGKILLed under 50 streams over two replicas")
    owners = {r["clients"].index(c) % 2 for c in r["moved"]}
    assert owners == {0, 1}  # streams of both replicas moved


async def test_no_failover_when_disabled_ends_with_the_clean_error(cluster: Cluster) -> None:
    env = {**_engines(cluster), "TOKENFLOW_STREAMS__MAX_FAILOVERS": "0"}
    url = await cluster.start_gateway("A", env_extra=env)
    clients = [_client(i, 600) for i in range(10)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        tasks = [asyncio.create_task(c.start(http, url)) for c in clients]
        await poll(lambda: _all_have(clients, 5), 30, "every stream delivering")
        on = {s["id"]: s["engine"] for s in await _info(http, url)}
        cluster.procs["engine"].popen.send_signal(signal.SIGSTOP)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    failed = [c for c in clients if on[c.sid or ""] == "sim"]
    assert failed and all(c.error_codes == ["engine_down"] and c.finish_reasons == [] for c in failed)
    assert all(c.tokens() == list(range(len(c.tokens()))) for c in failed)
    assert all(_whole(c, 600) for c in clients if c not in failed)


async def test_non_streaming_requests_fail_over_too(cluster: Cluster) -> None:
    url = await cluster.start_gateway("A", env_extra=_engines(cluster))
    n, max_tokens = 10, 600
    bodies = [{**_client(i, max_tokens).body, "stream": False} for i in range(n)]
    for b in bodies:
        b.pop("stream_options")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def one(i: int) -> dict[str, Any]:
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            async with http.post(url + path, json=bodies[i]) as r:
                assert r.status == 200, await r.text()
                out: dict[str, Any] = await r.json()
                return out

        tasks = [asyncio.create_task(one(i)) for i in range(n)]

        async def all_producing() -> bool:
            info = await _info(http, url)
            return len(info) == n and all(s["generated_tokens"] >= 10 for s in info)

        await poll(all_producing, 30, "every request producing")
        on = {s["id"]: s["engine"] for s in await _info(http, url)}
        cluster.procs["engine"].popen.send_signal(signal.SIGKILL)
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        continued = await _failovers(http, url, "sim", "continued")
    expected = "".join(f" tok{k}" for k in range(max_tokens))
    for i, a in enumerate(answers):
        choice = a["choices"][0]
        text = choice["message"]["content"] if i % 2 else choice["text"]
        prompt = text_tokens(bodies[i]["prompt"]) if "prompt" in bodies[i] else sum(
            text_tokens(m["content"]) for m in bodies[i]["messages"])
        assert text == expected and choice["finish_reason"] == "length"
        assert a["usage"] == {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                              "total_tokens": prompt + max_tokens}
    moved = sum(1 for e in on.values() if e == "sim")
    print(f"\nengine SIGKILLed under {n} non-streaming requests: {moved} moved, every answer whole")
    assert moved >= 1 and continued == moved


async def test_streams_of_a_dead_replica_whose_engine_died_too_continue_on_the_other_engine(cluster: Cluster) -> None:
    env = _engines(cluster)
    a = await cluster.start_gateway("A", env_extra=env)
    b = await cluster.start_gateway("B", env_extra=env)
    n, max_tokens = 12, 120
    clients = [_client(i, max_tokens, rate=40, pacing="smooth") for i in range(n)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, sock_read=20)) as http:
        tasks = [asyncio.create_task(c.start(http, a)) for c in clients]
        await poll(lambda: _all_have(clients, 5), 30, "every stream delivering through A")
        on = {s["id"]: s["engine"] for s in await _info(http, a)}
        cluster.procs["A"].popen.send_signal(signal.SIGKILL)  # first: A cannot move its streams itself
        cluster.procs["engine"].popen.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        cut = [c for c in clients if not c.done]
        await asyncio.wait_for(asyncio.gather(*(c.resume(http, b, "get") for c in cut)), 40)
        rerouted = await _failovers(http, b, "sim", "rerouted")
    stranded = [c for c in clients if on[c.sid or ""] == "sim"]
    lost, dup, disorder = lost_and_duplicated(clients, max_tokens)
    print(f"\nreplica A and engine 'sim' SIGKILLed under {n} streams: {len(cut)} resumed on B, {len(stranded)} of "
          f"them recorded on the dead engine went to the other; lost = {lost}, duplicated = {dup}")
    assert stranded and rerouted >= len(stranded)
    assert (lost, dup, disorder) == (0, 0, 0)
    assert all(c.done and c.finish_reasons == ["length"] for c in clients)
    assert not [e for c in clients for e in c.errors if not e.startswith("cut:")]
