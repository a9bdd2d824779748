"""Engine control API v1 (docs/engine-control-api.md), checked over HTTP against a live engine.

Reusable against any backend: only counts and statuses are asserted, never the engine's timings or text.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.engines import control_api

from .client import STATUSES, TIMEOUT, EngineAPI, new_id, poll
from .conftest import MEASUREMENTS

ENGINE_FIELDS = {
    "name": str, "kind": str, "block_size": int, "max_num_seqs": int, "kv_bytes_per_token": int,
    "kv_device_capacity_tokens": int, "kv_device_used_tokens": int, "kv_host_capacity_tokens": int,
    "kv_host_used_tokens": int, "num_running": int, "num_waiting": int, "num_held": int, "num_loading": int,
    "num_parked": int,
}
RATE_FIELDS = (
    "step_time_s", "decode_step_time_s", "decode_tokens_per_s", "prefill_tokens_per_s", "h2d_bytes_per_s",
    "d2h_bytes_per_s",
)
COUNTERS = ("preemptions", "resumes", "prefetches", "aborts", "host_restored_tokens", "recomputed_tokens")
REQUEST_FIELDS = {
    "id": str, "status": str, "priority": int, "arrival_time": (int, float), "prompt_tokens": int,
    "output_tokens": int, "computed_tokens": int, "kv_device_tokens": int, "kv_host_tokens": int,
    "preemptions": int,
}
# A request a test acts on mid-stream: long enough that it cannot finish between the engine's state showing it
# running and the command reaching the engine, even on a loaded machine; about 2.5 s on a tiny CPU model.
ACTED_ON = 320
LONG = 900  # a request that cannot finish on its own within the test (max_model_len 1024)
GONE_S = 3.0  # a disconnected client's request must leave the state well within this


def check_error_shape(body: object) -> dict:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"]
    assert "type" in err and "code" in err
    return err


async def measure(api: EngineAPI, what: str, seconds: float) -> None:
    """Record a measurement for the end-of-run summary, labelled with the engine it was taken on."""
    e = (await api.state())["engine"]
    MEASUREMENTS[f"{e['kind']} {e['name']}: {what}"] = f"{seconds * 1000:.1f} ms"


async def counters(api: EngineAPI) -> dict[str, int]:
    return (await api.state())["engine"]["counters"]


# ------------------------------------------------------------------ state


async def test_state_shape_and_version_header(api: EngineAPI) -> None:
    async with api.s.get(api.url + control_api.STATE_PATH) as r:
        assert r.status == 200
        assert r.headers.get(control_api.VERSION_HEADER) == control_api.VERSION
        assert r.content_type == "application/json"
        st = await r.json()
    assert set(st) >= {"engine", "requests"} and isinstance(st["requests"], list)
    e = st["engine"]
    for k, typ in ENGINE_FIELDS.items():
        assert isinstance(e.get(k), typ) and not isinstance(e[k], bool), f"engine.{k} = {e.get(k)!r}"
    assert e["kind"] in ("simulated", "vllm")
    for k in RATE_FIELDS:
        assert k in e and (e[k] is None or (isinstance(e[k], (int, float)) and e[k] > 0)), f"engine.{k}"
    assert set(e["counters"]) >= set(COUNTERS)
    for k in COUNTERS:
        assert isinstance(e["counters"][k], int) and e["counters"][k] >= 0
    assert e["block_size"] > 0 and e["max_num_seqs"] > 0 and e["kv_bytes_per_token"] > 0
    assert 0 <= e["kv_device_used_tokens"] <= e["kv_device_capacity_tokens"]
    assert 0 <= e["kv_host_used_tokens"] <= e["kv_host_capacity_tokens"]


async def test_submitted_request_appears_with_its_id_and_leaves_when_done(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, ACTED_ON, priority=3)
    r = await poll(lambda: api.req(rid), what=f"{rid} in state")
    for k, typ in REQUEST_FIELDS.items():
        assert isinstance(r.get(k), typ) and not isinstance(r[k], bool), f"request.{k} = {r.get(k)!r}"
    assert r["status"] in STATUSES
    assert r["max_tokens"] == ACTED_ON and r["priority"] == 3
    assert r["prompt_tokens"] > 0 and abs(r["arrival_time"] - time.time()) < 3600
    async with api.s.get(f"{api.url}/control/v1/requests/{rid}") as resp:
        assert resp.status == 200
        one = await resp.json()
    assert one["id"] == rid and set(one) >= set(REQUEST_FIELDS)
    state, r = await api.wait_running(rid)  # one snapshot: the request may finish right after it
    assert r["kv_device_tokens"] > 0 and r["computed_tokens"] > 0 and r["output_tokens"] >= 1
    assert r["kv_device_tokens"] % state["engine"]["block_size"] == 0
    assert state["engine"]["kv_device_used_tokens"] >= r["kv_device_tokens"]
    await st.finished()
    assert st.count == ACTED_ON and st.finish_reason == "length"
    # a finished request leaves the state at once: by the time its stream ended it is gone
    await api.wait_gone(rid, timeout=5)
    async with api.s.get(f"{api.url}/control/v1/requests/{rid}") as resp:
        assert resp.status == 404
        check_error_shape(await resp.json())


# ------------------------------------------------------------------ preempt / resume / prefetch


async def _hold(api: EngineAPI, rid: str, st) -> dict:
    """Preempt a streaming request; check the held state and that nothing more is delivered."""
    res = await api.command("preempt", rid)
    assert res == {"id": rid, "op": "preempt", "ok": True, "status": "held"} or (
        res["ok"] and res["status"] == "held" and res["id"] == rid and res["op"] == "preempt"), res
    r = await api.req(rid)
    assert r is not None and r["status"] == "held"
    assert r["kv_device_tokens"] == 0 and r["computed_tokens"] == 0
    held_out = r["output_tokens"]
    # every token computed before the hold reaches the client, and no more
    await poll(lambda: asyncio.sleep(0, result=st.count >= held_out), what="tokens computed before the hold")
    await asyncio.sleep(0.5)  # observe a quiet interval: a held request must not progress
    r2 = await api.req(rid)
    assert r2 is not None and r2["status"] == "held" and r2["output_tokens"] == held_out
    assert st.count == held_out, f"client got {st.count} tokens while the engine held {held_out}"
    assert not st.done
    return r2


async def test_preempt_holds_and_resume_completes_exactly(api: EngineAPI) -> None:
    rid = new_id()
    before = await counters(api)
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid, 3)
    r = await _hold(api, rid, st)
    assert r["preemptions"] >= 1
    assert 0 < r["output_tokens"] < ACTED_ON
    assert (await api.command("preempt", rid))["status"] == "held"  # preempting a held request: no-op

    res = await api.command("resume", rid)
    assert res["ok"] and res["status"] in {"waiting", "running", "loading"}
    await st.finished()
    assert st.count == ACTED_ON, f"{st.count} tokens, expected exactly {ACTED_ON}"
    assert st.usage is not None and st.usage["completion_tokens"] == ACTED_ON
    assert st.finish_reason == "length" and st.saw_done
    after = await counters(api)
    assert after["preemptions"] >= before["preemptions"] + 1
    assert after["resumes"] >= before["resumes"] + 1
    # the held request's KV came back somehow: reloaded from host or recomputed
    restored = after["host_restored_tokens"] - before["host_restored_tokens"]
    recomputed = after["recomputed_tokens"] - before["recomputed_tokens"]
    assert restored + recomputed > 0
    await api.wait_gone(rid, timeout=5)


async def test_max_tokens_reports_the_limit_the_engine_applies(api: EngineAPI) -> None:
    """Without max_tokens the state shows the engine's default limit (or null if there is none but
    max_model_len), and the request stops exactly there."""
    rid = new_id()
    body = await api.body(rid, 1)
    del body["max_tokens"]
    st = await api.start_body(rid, body)
    r = await poll(lambda: api.req(rid), what=f"{rid} in state")
    limit = r["max_tokens"]
    if limit is None:
        assert (await api.command("abort", rid))["ok"]
        await st.finished()
    else:
        assert isinstance(limit, int) and limit >= 1
        await st.finished()
        assert st.count == limit and st.finish_reason == "length"
    await api.wait_gone(rid, timeout=5)


async def test_prefetch_loads_then_resume_runs(api: EngineAPI) -> None:
    rid = new_id()
    before = await counters(api)
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid, 3)
    held = await _hold(api, rid, st)
    res = await api.command("prefetch", rid)
    assert res["ok"] and res["status"] in {"loading", "parked"}
    r = await api.wait_status(rid, "parked")
    # An engine may compute the next token before it parks (so that resume is one decode step), no more.
    assert r["output_tokens"] in (held["output_tokens"], held["output_tokens"] + 1)
    if r["kv_host_tokens"] > 0:
        assert r["kv_device_tokens"] > 0  # the host copy is back on the device
    assert (await api.command("prefetch", rid))["status"] == "parked"  # from parked: no-op
    await st.wait_tokens(r["output_tokens"])
    await asyncio.sleep(0.3)  # parked requests do not compute
    r2 = await api.req(rid)
    assert r2 is not None and r2["status"] == "parked" and r2["output_tokens"] == r["output_tokens"]
    assert st.count == r["output_tokens"]
    await api.command("resume", rid)
    await st.finished()
    assert st.count == ACTED_ON and st.usage and st.usage["completion_tokens"] == ACTED_ON
    after = await counters(api)
    assert after["prefetches"] >= before["prefetches"] + 1


async def test_prefetch_and_resume_are_noops_on_live_requests(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid)
    for op in ("prefetch", "resume"):
        res = await api.command(op, rid)
        assert res["ok"] and res["status"] in {"waiting", "running"}, res
    await st.finished()
    assert st.count == ACTED_ON


async def test_preempt_of_a_queued_request_and_its_host_copy_while_held(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid, 3)
    r = await _hold(api, rid, st)
    # what the engine keeps on host for a held request never exceeds what it computed
    assert 0 <= r["kv_host_tokens"] <= r["prompt_tokens"] + r["output_tokens"]
    e = (await api.state())["engine"]
    assert e["num_held"] >= 1 and e["kv_host_used_tokens"] >= r["kv_host_tokens"]
    await api.command("resume", rid)
    await st.finished()
    assert st.count == ACTED_ON


# ------------------------------------------------------------------ priority and abort


async def test_priority_change_is_reflected(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid)
    res = await api.command("priority", rid, priority=-5)
    assert res["ok"] and res["status"] in STATUSES
    assert (await api.req(rid))["priority"] == -5
    status, body, _ = await api.post_raw(f"/control/v1/requests/{rid}/priority", json={"priority": 7})
    assert status == 200 and body["ok"] and body["id"] == rid and body["op"] == "priority"
    assert (await api.req(rid))["priority"] == 7
    await st.finished()
    assert st.count == ACTED_ON


async def test_abort_ends_the_stream_and_frees_the_request(api: EngineAPI) -> None:
    before = await counters(api)
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid, 2)
    res = await api.command("abort", rid)
    assert res["ok"] and res["id"] == rid and res["op"] == "abort"
    await st.finished()
    assert st.finish_reason == "abort" and st.count < ACTED_ON
    await api.wait_gone(rid, timeout=5)
    assert (await api.command("abort", rid))["error"]["code"] == "not_found"
    # single-command form, on a held request
    rid2 = new_id()
    st2 = await api.start(rid2, ACTED_ON)
    await api.wait_running(rid2, 2)
    await api.command("preempt", rid2)
    status, body, _ = await api.post_raw(f"/control/v1/requests/{rid2}/abort")
    assert status == 200 and body["ok"]
    await st2.finished()
    assert st2.finish_reason == "abort"
    await api.wait_gone(rid2, timeout=5)
    after = await counters(api)
    assert after["aborts"] >= before["aborts"] + 2


async def test_waiting_queue_follows_priority_changes(api: EngineAPI) -> None:
    """With every batch slot taken, freed slots go to waiting requests by (changed) priority."""
    e = (await api.state())["engine"]
    n = e["max_num_seqs"]
    if n > 64:
        pytest.skip(f"max_num_seqs {n} is too many streams to saturate in a test")
    # LONG: a blocker that finished on its own would free its slot before the test aborts it; so would a
    # waiting one, admitted, before the next abort (then two would look admitted at once)
    blockers = [new_id("blk") for _ in range(n)]
    for rid in blockers:
        await api.start(rid, LONG)
    for rid in blockers:
        await api.wait_running(rid)
    w1, w2, w3 = new_id("w1"), new_id("w2"), new_id("w3")
    for rid, prio in ((w1, 5), (w2, 5), (w3, 1)):
        await api.start(rid, LONG, priority=prio)
    # queued, not admitted: "loading" too, since every request here shares one prompt and an engine
    # with a KV cache tier may start fetching that prefix for a waiting request before a slot frees
    queued = {"waiting", "loading"}
    for rid in (w1, w2, w3):
        await api.wait_status(rid, queued)
    assert (await api.command("priority", w2, priority=-1))["status"] in queued

    async def first_admitted(candidates: list[str]) -> str:
        async def check() -> str | None:
            reqs = (await api.state())["requests"]
            by_id = {r["id"]: r for r in reqs}
            # running (or already gone); "loading" is not admission: an engine may start fetching the KV
            # of several waiting requests (a prefix hit in a KV cache tier) before any slot is free
            moved = [c for c in candidates if c not in by_id or by_id[c]["status"] == "running"]
            if len(moved) > 1:  # say what the engine did, to debug it
                seen = [(r["id"][:6], r["status"], r["priority"], r["output_tokens"]) for r in reqs]
                return f"several admitted at once: {seen}"
            return moved[0] if moved else None
        return await poll(check, what="a waiting request to be admitted")

    await api.command("abort", blockers[0])
    assert await first_admitted([w1, w2, w3]) == w2  # raised to -1: first, though it came after w1
    await api.command("abort", blockers[1])
    assert await first_admitted([w1, w3]) == w3  # priority 1 before 5
    res = await api.commands([{"op": "abort", "id": rid} for rid in blockers[2:] + [w1, w2, w3]])
    assert all(r["ok"] for r in res)
    await api.wait_drained()


# ------------------------------------------------------------------ batches and errors


async def test_batched_commands_are_independent_and_ordered(api: EngineAPI) -> None:
    a, b = new_id(), new_id()
    n = ACTED_ON
    sa = await api.start(a, n)
    sb = await api.start(b, n)
    await api.wait_running(a, 2)
    await api.wait_running(b, 2)
    missing = new_id("missing")
    cmds = [
        {"op": "preempt", "id": a},
        {"op": "resume", "id": missing},
        {"op": "explode", "id": b},
        {"op": "priority", "id": b, "priority": "high"},
        {"op": "priority", "id": b},
        {"op": "preempt"},
        {"op": "priority", "id": b, "priority": 2},
        {"op": "preempt", "id": b},
        {"op": "resume", "id": a},
        {"op": "resume", "id": b},
    ]
    res = await api.commands(cmds)
    assert [r["ok"] for r in res] == [True, False, False, False, False, False, True, True, True, True]
    assert [r.get("op") for r in res[:2]] == ["preempt", "resume"]
    assert res[0]["id"] == a and res[0]["status"] == "held"
    assert res[1]["id"] == missing and res[1]["error"]["code"] == "not_found"
    for r in res[2:6]:
        assert r["error"]["code"] == "invalid_command" and isinstance(r["error"]["message"], str)
    assert res[6]["status"] in STATUSES and res[7]["status"] == "held"
    assert res[8]["status"] in {"waiting", "running", "loading"}
    assert (await api.req(b))["priority"] == 2
    await sa.finished()
    await sb.finished()
    assert sa.count == n and sb.count == n


async def test_unknown_ids_get_not_found(api: EngineAPI) -> None:
    rid = new_id("nobody")
    assert set(control_api.OPS) == {"preempt", "resume", "prefetch", "priority", "abort"}
    for op in ("preempt", "resume", "prefetch", "abort"):
        status, body, _ = await api.post_raw(f"/control/v1/requests/{rid}/{op}")
        assert status == 404, (op, status)
        assert check_error_shape(body)["code"] == "not_found"
    status, body, _ = await api.post_raw(f"/control/v1/requests/{rid}/priority", json={"priority": 1})
    assert status == 404 and check_error_shape(body)["code"] == "not_found"
    async with api.s.get(f"{api.url}/control/v1/requests/{rid}") as r:
        assert r.status == 404
        check_error_shape(await r.json())
    res = await api.commands([{"op": op, "id": rid, "priority": 0} if op == "priority" else {"op": op, "id": rid}
                              for op in control_api.OPS])
    assert all(not r["ok"] and r["error"]["code"] == "not_found" and r["id"] == rid for r in res)


@pytest.mark.parametrize(
    "data",
    [b"not json", b"", b"[]", b'{"cmds": []}', b'{"commands": {"op": "preempt"}}', b'{"commands": "x"}'],
)
async def test_malformed_command_bodies_get_400(api: EngineAPI, data: bytes) -> None:
    status, body, _ = await api.post_raw("/control/v1/commands", data=data)
    assert status == 400
    check_error_shape(body)


async def test_too_many_commands_get_400(api: EngineAPI) -> None:
    limit = control_api.MAX_COMMANDS  # the gateway's engine client splits longer batches at this size
    cmds = [{"op": "resume", "id": f"x{i}"} for i in range(limit + 1)]
    status, body, _ = await api.post_raw(control_api.COMMANDS_PATH, json={"commands": cmds})
    assert status == 400
    check_error_shape(body)
    res = await api.commands(cmds[:limit])  # the limit itself is fine
    assert all(r["error"]["code"] == "not_found" for r in res)


async def test_request_ids_follow_the_id_pattern(api: EngineAPI) -> None:
    longest = "a.B-9_" * 21 + "xy"  # 128 characters, every kind the pattern allows
    assert control_api.ID_RE.fullmatch(longest)
    st = await api.start(longest, 4)
    await st.finished()
    assert st.count == 4
    for bad in ("has space", "x" * 129, "", "slash/no"):
        assert not control_api.ID_RE.fullmatch(bad)
        status, body, _ = await api.post_raw("/v1/completions", json=await api.body(bad, 4))
        assert status == 400, bad
        check_error_shape(body)


async def test_bad_single_priority_body_gets_400(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid)
    for data in (b"nope", b"{}", b'{"priority": "high"}', b'{"priority": 1.5}'):
        status, body, _ = await api.post_raw(f"/control/v1/requests/{rid}/priority", data=data)
        assert status == 400, data
        check_error_shape(body)
    await st.finished()


async def test_duplicate_live_id_is_rejected(api: EngineAPI) -> None:
    rid = new_id()
    # Held, so that it is certainly still live when the duplicate arrives (a short request on a fast engine
    # can finish before a loaded client has read its first token).
    st = await api.start(rid, LONG)
    await api.wait_running(rid)
    r = await _hold(api, rid, st)
    status, body, _ = await api.post_raw("/v1/completions", json=await api.body(rid, 4))
    assert status == 400
    assert check_error_shape(body)["code"] == "duplicate_id"
    await api.command("resume", rid)
    await st.wait_tokens(r["output_tokens"] + 1)  # the first request is unaffected: it goes on
    assert (await api.command("abort", rid))["ok"]
    await st.finished()
    await api.wait_gone(rid, timeout=5)
    again = await api.start(rid, 4)  # a finished id may be used again
    await again.finished()
    assert again.count == 4


# ------------------------------------------------------------------ disconnects and leaks


async def test_client_disconnect_removes_the_request(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, LONG)
    await api.wait_running(rid, 2)
    st.disconnect()
    took = await api.wait_gone(rid, timeout=GONE_S)
    await measure(api, "disconnect -> gone (running)", took)


async def test_held_request_is_freed_when_its_client_disconnects(api: EngineAPI) -> None:
    rid = new_id()
    st = await api.start(rid, LONG)
    await api.wait_running(rid, 2)
    await _hold(api, rid, st)
    st.disconnect()
    took = await api.wait_gone(rid, timeout=GONE_S)
    await measure(api, "disconnect -> gone (held)", took)
    await api.wait_drained()


async def test_no_kv_leaks_after_a_mixed_workload(api: EngineAPI) -> None:
    ids = [new_id() for _ in range(6)]
    # The one to abort asks for LONG: on a fast engine a shorter one could finish before the abort lands.
    streams = [await api.start(rid, LONG if i == 3 else ACTED_ON, chat=(i % 2 == 1)) for i, rid in enumerate(ids)]
    for rid in ids:
        await api.wait_running(rid, 2)
    res = await api.commands([
        {"op": "preempt", "id": ids[0]},
        {"op": "preempt", "id": ids[1]},
        {"op": "preempt", "id": ids[2]},
        {"op": "prefetch", "id": ids[2]},
        {"op": "abort", "id": ids[3]},
        {"op": "priority", "id": ids[4], "priority": -1},
    ])
    assert all(r["ok"] for r in res), (res, [(s.count, s.finish_reason, s.done) for s in streams])
    streams[1].disconnect()  # held, then gone
    streams[5].disconnect()  # running, then gone
    await api.wait_status(ids[2], "parked")
    await api.commands([{"op": "resume", "id": ids[0]}, {"op": "resume", "id": ids[2]}])
    for i in (0, 2, 4):
        await streams[i].finished()
        assert streams[i].count == ACTED_ON
    await streams[3].finished()
    assert streams[3].finish_reason == "abort"
    st = await api.wait_drained()
    e = st["engine"]
    assert e["num_running"] == e["num_waiting"] == e["num_held"] == e["num_loading"] == e["num_parked"] == 0


async def test_commands_apply_quickly(api: EngineAPI) -> None:
    """Commands apply at the next step boundary: the result comes back within a few steps, not later."""
    rid = new_id()
    st = await api.start(rid, ACTED_ON)
    await api.wait_running(rid, 2)
    t0 = time.monotonic()
    await api.command("preempt", rid)
    took = time.monotonic() - t0
    await measure(api, "preempt command round trip", took)
    assert took < TIMEOUT
    await api.command("abort", rid)
    await st.finished()
