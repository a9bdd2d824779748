"""Per-request preemption on a real vLLM engine: exact greedy output, restore from host, idle holds, leaks.

All at temperature 0 in float32, where greedy output does not depend on batch composition, so any
difference from an uninterrupted run is a real loss or corruption of KV.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.vllm.client import Client, Gen, poll
from tests.vllm.conftest import MEASUREMENTS, Server

pytestmark = pytest.mark.vllm

NO_HOST_COPY = {"kv_transfer_params": {"max_offload_tokens": 0}}  # vLLM's per-request offload cap


def prompt(n: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of n token ids (the tiny model's vocabulary has 1024 ids; 0-3 are special)."""
    return [4 + (i * 37 + seed * 101) % 1000 for i in range(n)]


async def wait_output(client: Client, rid: str, k: int) -> None:
    """Wait until the engine (not the client, whose stream may lag on a loaded machine) has k tokens."""

    async def ok():
        r = await client.req(rid)
        assert r is not None, f"{rid} finished early"
        return r["output_tokens"] >= k

    await poll(ok, what=f"{rid} to reach {k} output tokens")


async def hold_each_at(client: Client, rids: tuple[str, ...], k: int) -> None:
    """Hold each request as soon as the engine has k of its tokens: polled together, so none runs on (and
    possibly to its end) while the test waits for another."""
    pending = list(rids)

    async def step() -> bool:
        for rid in list(pending):
            r = await client.req(rid)
            assert r is not None, f"{rid} finished early"
            if r["output_tokens"] >= k:
                res = await client.cmd("preempt", rid)
                assert res["status"] == "held", res
                pending.remove(rid)
        return not pending

    await poll(step, what=f"{', '.join(rids)} to reach {k} output tokens")


async def hold(client: Client, rid: str) -> dict:
    res = await client.cmd("preempt", rid)
    assert res["status"] == "held"
    r = await client.req(rid)
    assert r["status"] == "held" and r["kv_device_tokens"] == 0 and r["computed_tokens"] == 0
    return r


async def test_greedy_output_identical_across_preemptions(client: Client) -> None:
    """One request preempted 6 times (two holds with a prefetch) next to an uninterrupted one, and a
    third without any host copy (every resume recomputes): all three match uninterrupted runs."""
    p_host, p_none, p_other = prompt(300, 1), prompt(200, 2), prompt(150, 3)
    # Far past the last preemption point (130): on a loaded machine a control call can take seconds while the
    # engine goes on (the CPU build runs it in the API server's process), and a request must not end meanwhile.
    n = 1700
    # References without write-through: the host tier is content-addressed, so a reference run that stored
    # its KV would hand the preempted runs a host copy they did not write themselves.
    refs = await asyncio.gather(*(client.run(p, n, **NO_HOST_COPY) for p in (p_host, p_none, p_other)))
    c0 = await client.counters()
    g_host = await client.gen("ident-host", p_host, n)
    g_none = await client.gen("ident-none", p_none, n, **NO_HOST_COPY)
    g_other = await client.gen("ident-other", p_other, n)
    for i, k in enumerate((5, 25, 50, 75, 100, 130)):
        await hold_each_at(client, ("ident-host", "ident-none"), k)
        assert (await client.req("ident-none"))["kv_host_tokens"] == 0
        if i % 3 == 1:
            await client.cmd("prefetch", "ident-host")
            await client.wait_status("ident-host", "parked")
        await client.commands({"op": "resume", "id": "ident-host"}, {"op": "resume", "id": "ident-none"})
    outs = await asyncio.gather(g_host.done(), g_none.done(), g_other.done())
    assert outs[0] == refs[0], "preempted request with a host copy diverged"
    assert outs[1] == refs[1], "preempted request without a host copy diverged"
    assert outs[2] == refs[2], "the request running beside them diverged"
    c1 = await client.counters()
    assert c1["preemptions"] - c0["preemptions"] >= 12
    assert c1["host_restored_tokens"] > c0["host_restored_tokens"]
    assert c1["recomputed_tokens"] - c0["recomputed_tokens"] >= 6 * 200  # the copy-less one, every time


async def _hold_settled(client: Client, rid: str, p: list[int], n_before: int, **extra) -> tuple[Gen, dict]:
    """Start a long-context request, hold it after ``n_before`` tokens and wait until its write-through copy is
    complete (or, without one, known empty); return its stream and its held state."""
    g = await client.gen(rid, p, n_before + 400, **extra)  # ample room: aborted once measured
    await wait_output(client, rid, n_before)
    await hold(client, rid)
    block = (await client.state())["engine"]["block_size"]

    async def settled():
        r = await client.req(rid)
        full = (r["prompt_tokens"] + r["output_tokens"] - 1) // block * block
        return r if (not extra and r["kv_host_tokens"] >= full) or (extra and r["kv_host_tokens"] == 0) else None

    return g, await poll(settled, what="the held request's host copy to settle")


async def _resume_latency(client: Client, rid: str, p: list[int], n_before: int, **extra) -> tuple[float, dict, dict]:
    """Hold a long-context request, wait until its write-through copy is complete, resume it; return the
    seconds from resume to its next token, its held state, and the counter deltas."""
    g, held = await _hold_settled(client, rid, p, n_before, **extra)
    c0 = await client.counters()
    n = held["output_tokens"]
    await g.wait_tokens(n)  # everything computed before the hold has reached the client
    t0 = time.perf_counter()
    await client.cmd("resume", rid)
    await g.wait_tokens(n + 1)
    ttnt = g.arrivals[n] - t0
    c1 = await client.counters()
    await client.cmd("abort", rid)
    await g.done()
    return ttnt, held, {k: c1[k] - c0[k] for k in c1}


async def test_resume_restores_from_host_instead_of_recomputing(client: Client) -> None:
    p = prompt(1500, 4)
    t_host, held, d_host = await _resume_latency(client, "restore-host", p, 10)
    assert held["kv_host_tokens"] >= 1500  # the whole prompt and the decoded full blocks are on host
    assert d_host["host_restored_tokens"] >= held["kv_host_tokens"]
    block = (await client.state())["engine"]["block_size"]
    assert d_host["recomputed_tokens"] < block, d_host  # at most the unstored partial block
    # same length, other tokens: host copies are content-addressed and the first prompt's is there now
    t_re, _, d_re = await _resume_latency(client, "restore-none", prompt(1500, 40), 10, **NO_HOST_COPY)
    assert d_re["host_restored_tokens"] == 0
    assert d_re["recomputed_tokens"] >= 1500
    MEASUREMENTS["resume -> next token, 1.5k context, host restore"] = f"{t_host * 1000:.1f} ms"
    MEASUREMENTS["resume -> next token, 1.5k context, recompute"] = f"{t_re * 1000:.1f} ms"


async def test_a_prefetched_request_resumes_with_one_decode_step(client: Client) -> None:
    """Prefetch loads the host copy and computes the rest of the context (the unstored last block) up to the
    next token, so that the resume itself computes one token and recomputes nothing."""
    g, held = await _hold_settled(client, "prefetch-ready", prompt(1000, 6), 10)
    c0 = await client.counters()
    await client.cmd("prefetch", "prefetch-ready")
    parked = await client.wait_status("prefetch-ready", "parked")
    c1 = await client.counters()
    assert c1["host_restored_tokens"] - c0["host_restored_tokens"] >= held["kv_host_tokens"]
    assert parked["output_tokens"] == held["output_tokens"] + 1
    # everything but the last token on the device: resume computes just that one
    assert parked["computed_tokens"] == parked["prompt_tokens"] + parked["output_tokens"] - 1
    await g.wait_tokens(parked["output_tokens"])
    await client.cmd("resume", "prefetch-ready")
    await g.wait_tokens(parked["output_tokens"] + 1)
    c2 = await client.counters()
    assert c2["recomputed_tokens"] == c1["recomputed_tokens"], "the resume recomputed tokens"
    assert c2["host_restored_tokens"] == c1["host_restored_tokens"], "the resume loaded again"
    await client.cmd("abort", "prefetch-ready")
    await g.done()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / 100.0


async def test_held_and_parked_requests_make_no_tokens_and_let_the_engine_idle(
    client: Client, vllm_server: Server
) -> None:
    g = await client.gen("idle-held", prompt(100, 5), 400)
    await wait_output(client, "idle-held", 5)
    r = await hold(client, "idle-held")
    await g.wait_tokens(r["output_tokens"])  # what was computed before the hold reaches the client
    pids = vllm_server.pids()
    for status in ("held", "parked"):
        if status == "parked":
            await client.cmd("prefetch", "idle-held")
            r = await client.wait_status("idle-held", "parked")
            await g.wait_tokens(r["output_tokens"])  # the token computed before parking, if any
        n = len(g.tokens)
        await asyncio.sleep(0.3)  # let in-flight stores finish
        cpu0 = cpu_seconds(pids)
        await asyncio.sleep(3.0)  # observing a quiet interval is the point here
        used = cpu_seconds(pids) - cpu0
        MEASUREMENTS[f"server CPU over 3 s with one {status} request"] = f"{used:.2f} s"
        assert used < 0.6, f"engine busy ({used:.2f} CPU s in 3 s) with only a {status} request"
        assert len(g.tokens) == n, f"{status} request produced tokens"
        now = await client.req("idle-held")
        assert now["status"] == status and now["output_tokens"] == r["output_tokens"]
    # a parked request whose client goes away is freed, device and host
    g.disconnect()
    await poll(lambda: _gone(client, "idle-held"), timeout=5, what="the request to be freed")
    await client.wait_idle()


async def _gone(client: Client, rid: str) -> bool:
    return await client.req(rid) is None


async def test_200_preempt_resume_cycles_leak_nothing(client: Client) -> None:
    """200 preempt/resume cycles (every 7th through a prefetch) over two long requests; then their output
    still matches uninterrupted runs (greedy runs share prefixes, so a shorter reference suffices), and
    once they are aborted no device block, host chunk or pin is left behind."""
    p = [prompt(64, 6), prompt(80, 7)]
    k = 200  # compared prefix
    refs = await asyncio.gather(*(client.run(q, k, **NO_HOST_COPY) for q in p))
    ids = ["cyc-a", "cyc-b"]
    gens = [await client.gen(rid, q, 1900) for rid, q in zip(ids, p)]
    for rid in ids:
        await wait_output(client, rid, 2)
    for cycle in range(200):
        rid = ids[cycle % 2]
        res = (await client.commands({"op": "preempt", "id": rid}))[0]
        assert res["ok"] and res["status"] == "held", f"cycle {cycle}: {res}"
        if cycle % 7 == 0:
            await client.cmd("prefetch", rid)
        await client.cmd("resume", rid)
    for rid, g in zip(ids, gens):
        await wait_output(client, rid, k)
        await g.wait_tokens(k)
    assert [g.tokens[:k] for g in gens] == refs
    await client.commands(*({"op": "abort", "id": rid} for rid in ids))
    for g in gens:
        await g.done()
        assert g.finish_reason == "abort"
    st = await client.wait_idle()
    e = st["engine"]
    assert e["kv_device_used_tokens"] == 0 and e["kv_host_used_tokens"] == 0
    assert e["kv_host_pinned_chunks"] == 0
    assert e["num_held"] == e["num_parked"] == e["num_loading"] == 0


async def test_every_command_on_unknown_or_finished_ids_is_not_found(client: Client) -> None:
    await (await client.gen("finished-1", prompt(20, 8), 4)).done()
    await poll(lambda: _gone(client, "finished-1"), timeout=5, what="finished request to leave")
    for rid in ("finished-1", "never-seen", "x" * 128, "a.b-c_d"):
        res = await client.commands(*({"op": op, "id": rid} for op in ("preempt", "resume", "prefetch", "abort")),
                                    {"op": "priority", "id": rid, "priority": 1})
        assert [r["error"]["code"] for r in res] == ["not_found"] * 5, res
        for op in ("preempt", "resume", "prefetch", "abort"):
            async with client.s.post(f"{client.url}/control/v1/requests/{rid}/{op}") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with client.s.get(f"{client.url}/control/v1/requests/{rid}") as r:
            assert r.status == 404
    # the engine is unharmed
    async with client.s.get(client.url + "/health") as r:
        assert r.status == 200
    assert len(await client.run(prompt(20, 9), 8)) == 8
