"""Priority set after submission re-orders vLLM's waiting queue (``--scheduling-policy priority``)."""
from __future__ import annotations

import asyncio

import pytest

from tests.vllm.client import Client, poll
from tests.vllm.test_preemption import prompt, wait_output

pytestmark = pytest.mark.vllm


async def test_raised_priority_is_admitted_first(client: Client) -> None:
    max_seqs = (await client.state())["engine"]["max_num_seqs"]
    blockers = [f"prio-b{i}" for i in range(max_seqs)]
    gens = [await client.gen(rid, prompt(16, 20 + i), 1500) for i, rid in enumerate(blockers)]
    for rid in blockers:
        await wait_output(client, rid, 1)  # all slots taken
    # Long answers: the one admitted keeps the freed slot (a short one could finish and let the other in before
    # the state is read, and both would look admitted).
    late = [await client.gen(rid, prompt(16, 40 + i), 1500, priority=5) for i, rid in enumerate(("prio-w1", "prio-w2"))]
    for rid in ("prio-w1", "prio-w2"):
        assert (await client.wait_status(rid, "waiting"))["priority"] == 5
    res = await client.cmd("priority", "prio-w2", priority=-1)  # arrived last, now most important
    assert res["status"] == "waiting"
    await client.cmd("preempt", blockers[0])  # frees one slot

    async def admitted():
        st = {r["id"]: r["status"] for r in (await client.state())["requests"]}
        return [rid for rid in ("prio-w1", "prio-w2") if st.get(rid, "gone") != "waiting"] or None

    first = await poll(admitted, what="one of the queued requests to be admitted")
    assert first == ["prio-w2"], first
    await client.commands(*({"op": "abort", "id": rid} for rid in (*blockers, "prio-w1", "prio-w2")))
    await asyncio.gather(*(g.done() for g in gens + late))
    await client.wait_idle()
