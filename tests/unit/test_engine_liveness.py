"""The engine client against real misbehaving HTTP servers: every transport failure leaves it as an EngineError
(the control loop then marks the engine down, no traceback), command batches split at the control API's limit,
and the liveness checks (engine down, stream stalled) end the right streams and only those."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.control import ControlLoop
from gateway.engines import control_api as api
from gateway.engines import liveness
from gateway.engines.client import EngineClient, EngineDown, EngineError, EngineStalled, EngineTimeout
from gateway.engines.control_api import EngineState, EngineStatus, RequestState
from gateway.metrics import Metrics
from gateway.policy import make_policy

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Serve], Awaitable[str]]]:
    """A TCP server running the given connection handler; its base URL."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Serve) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        srv = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start
    for w in writers:
        w.close()
    for s in servers:
        s.close()
        await s.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def _disconnect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.close()  # aiohttp: ServerDisconnectedError


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    await reader.read()  # until the client gives up


async def _garbage_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("server", [_disconnect, _garbage_status], ids=["server-disconnected", "not-http"])
async def test_transport_errors_leave_the_client_as_engine_errors(raw_server, http, server) -> None:
    client = EngineClient("e", await raw_server(server), http, state_timeout_s=2.0)
    for call in (client.state(), client.commands([{"op": "abort", "id": "x"}]), client.models()):
        with pytest.raises(EngineError) as info:
            await call
        assert info.value.status in (502, 503)
        assert info.value.__cause__ is None or not isinstance(info.value.__cause__, EngineError)


async def test_a_state_request_not_answered_times_out_as_an_engine_error(raw_server, http) -> None:
    client = EngineClient("e", await raw_server(_never_answer), http, state_timeout_s=0.3)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(EngineTimeout):
        await client.state()
    assert asyncio.get_running_loop().time() - t0 < 2.0


async def _engine_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("body", [b"[]", b"{\"engine\": [1]}", b"not json", b"{\"requests\": [{}]}"])
async def test_a_malformed_state_answer_is_an_engine_error(http, body) -> None:
    async def state(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={api.VERSION_HEADER: api.VERSION})

    runner, url = await _engine_app(state)
    try:
        with pytest.raises(EngineError):
            await EngineClient("e", url, http).state()
    finally:
        await runner.cleanup()


async def test_the_control_loop_marks_a_disconnecting_engine_down_without_a_traceback(raw_server, http, caplog
                                                                                       ) -> None:
    client = EngineClient("e", await raw_server(_disconnect), http)
    metrics = Metrics()
    loop = ControlLoop(client, make_policy("fcfs"), lambda: [], asyncio.get_running_loop().time, 0.05, metrics)
    loop.healthy = True
    with caplog.at_level(logging.WARNING):
        assert await loop.tick() == []
    assert not loop.healthy and isinstance(client.down, EngineDown)
    assert not [r for r in caplog.records if r.exc_info], "a transport error is not a bug: no traceback"
    with pytest.raises(EngineDown):  # new streams fail at once while the engine is down
        await client.open_stream("completion", {"prompt": "x"})


async def test_command_batches_are_split_at_the_control_api_limit(http) -> None:
    calls: list[int] = []

    async def commands(request: web.Request) -> web.Response:
        batch = orjson.loads(await request.read())["commands"]
        if len(batch) > api.MAX_COMMANDS:  # what an engine does with an over-long batch
            return web.Response(status=400)
        calls.append(len(batch))
        results = [{"id": c["id"], "op": c["op"], "ok": True, "status": "held"} for c in batch]
        return web.Response(body=orjson.dumps({"results": results}), content_type="application/json")

    runner, url = await _engine_app(commands)
    try:
        n = 2 * api.MAX_COMMANDS + 452
        cmds = [{"op": "preempt", "id": f"r{i}"} for i in range(n)]
        results = await EngineClient("e", url, http).commands(cmds)
    finally:
        await runner.cleanup()
    assert calls == [api.MAX_COMMANDS, api.MAX_COMMANDS, 452]
    assert [r.id for r in results] == [c["id"] for c in cmds]  # one result per command, in order


async def test_fewer_results_than_commands_is_an_engine_error(http) -> None:
    async def commands(request: web.Request) -> web.Response:
        return web.Response(body=b'{"results": []}', content_type="application/json")

    runner, url = await _engine_app(commands)
    try:
        with pytest.raises(EngineError):
            await EngineClient("e", url, http).commands([{"op": "abort", "id": "a"}])
    finally:
        await runner.cleanup()


async def test_no_response_head_within_the_first_byte_timeout(raw_server, http) -> None:
    client = EngineClient("e", await raw_server(_never_answer), http, first_byte_timeout_s=0.3)
    with pytest.raises(EngineTimeout, match="response head"):
        await asyncio.wait_for(client.open_stream("completion", {"prompt": "x"}, "r1"), 5)


async def test_a_request_waiting_for_its_head_fails_when_the_engine_is_marked_down(raw_server, http) -> None:
    client = EngineClient("e", await raw_server(_never_answer), http)
    opening = asyncio.create_task(client.open_stream("completion", {"prompt": "x"}, "r1"))
    while not client.open_streams():  # sent: registered before its head
        await asyncio.sleep(0.01)
    client.mark_down("state request timed out")
    client.fail_silent(asyncio.get_running_loop().time(), 0.0)
    with pytest.raises(EngineDown):
        await asyncio.wait_for(opening, 5)


def _sse_server(first: bytes, read_head: bool = True) -> Serve:
    """An engine that sends a 200 head and ``first``, then nothing (the connection stays open)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if read_head:
            await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if first:
            writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await reader.read()
    return serve


_TOKEN = b'data: {"choices": [{"text": " tok0", "token_ids": [1]}]}\n\n'


def _state(rid: str, status: EngineStatus) -> EngineState:
    return EngineState(engine=api.EngineView.from_json({}), requests={rid: RequestState(id=rid, status=status)})


@pytest.mark.parametrize("status,paused,stalls", [
    (EngineStatus.RUNNING, False, True),
    (EngineStatus.HELD, False, False),  # held on purpose by the policy: silence is expected
    (EngineStatus.PARKED, False, False),
    (EngineStatus.RUNNING, True, False),  # the gateway stopped reading (read-ahead): silence says nothing
])
async def test_a_running_stream_that_goes_silent_is_ended_as_stalled(raw_server, http, status, paused, stalls) -> None:
    client = EngineClient("e", await raw_server(_sse_server(_TOKEN)), http)
    upstream = await client.open_stream("completion", {"prompt": "x"}, "r1")
    got: list[int] = []
    upstream.attach(lambda batch: got.extend(d.tokens for d in batch))
    while not got:
        await asyncio.sleep(0.01)
    upstream.pause_reading(paused)
    later = asyncio.get_running_loop().time() + 10.0
    ended = client.fail_stalled(_state("r1", status), later, stall_s=5.0)
    assert (ended == [upstream]) is stalls
    if stalls:
        with pytest.raises(EngineStalled):
            await upstream.wait()
    else:
        assert not upstream.ended
        upstream.close()


@dataclass
class _Act:
    request_id: str | None
    last_data_at: float
    reading: bool = True
    got_deltas: bool = True
    engine_preemptions: int = 0
    running_since: float = 0.0


def test_silent_streams_of_a_down_engine() -> None:
    quiet, busy = _Act("a", 0.0), _Act("b", 9.5)
    assert liveness.silent([quiet, busy], now=10.0, quiet_s=2.0) == [quiet]


def test_stalled_needs_running_reading_and_a_first_token() -> None:
    reqs = {i: RequestState(id=i, status=EngineStatus.RUNNING) for i in "abcd"}
    reqs["w"] = RequestState(id="w", status=EngineStatus.WAITING)
    acts = [_Act("a", 0.0), _Act("b", 0.0, reading=False), _Act("c", 0.0, got_deltas=False), _Act("d", 9.0),
            _Act("w", 0.0), _Act("gone", 0.0), _Act(None, 0.0)]
    assert [a.request_id for a in liveness.stalled(acts, reqs, now=10.0, stall_s=5.0)] == ["a"]


async def test_held_silent_streams_survive_one_missed_heartbeat_and_end_after_two(raw_server, http) -> None:
    """The engine's state request fails (its control API is gone) while a stream is open and silent: new
    requests are refused at once, but the stream ends only once the engine stayed silent for two heartbeats."""
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /control/v1/state"):
            writer.close()  # the control API is gone
            return
        await _sse_server(_TOKEN, read_head=False)(reader, writer)  # one token, then silence (held, or frozen)

    client = EngineClient("e", await raw_server(engine), http)
    upstream = await client.open_stream("completion", {"prompt": "x"}, "r1")
    upstream.attach(lambda batch: None)
    offset = [0.0]
    loop = asyncio.get_running_loop()
    control = ControlLoop(client, make_policy("fcfs"), lambda: [], lambda: loop.time() + offset[0], 0.05, Metrics(),
                          down_after_s=2.0)
    control.healthy = True
    await control.tick()  # first missed heartbeat
    assert client.down is not None and not upstream.ended
    offset[0] = 3.0  # still silent, but not for two heartbeats
    await control.tick()
    assert not upstream.ended
    offset[0] = 4.5
    await control.tick()
    assert upstream.ended
    with pytest.raises(EngineDown):
        await upstream.wait()


def _running(rid: str, preemptions: int = 0, status: EngineStatus = EngineStatus.RUNNING) -> dict[str, RequestState]:
    return {rid: RequestState(id=rid, status=status, preemptions=preemptions)}


def _tick(act: _Act, reqs: dict[str, RequestState], now: float) -> list[str | None]:
    liveness.observe([act], reqs, now)
    return [a.request_id for a in liveness.stalled([act], reqs, now, stall_s=5.0)]


def test_a_request_the_engine_keeps_preempting_is_not_stalled() -> None:
    """An engine short of KV preempts and re-admits a request by itself between ticks (vLLM under a plain
    FCFS burst): every tick shows it running, but with one more preemption; it produces nothing for a long
    time and is not a broken data path."""
    act = _Act("a", last_data_at=0.0)
    for t in range(1, 30):
        assert _tick(act, _running("a", preemptions=t), float(t)) == []
    # it then runs without another preemption and still sends nothing: that is a stall, after stall_s
    assert _tick(act, _running("a", preemptions=29), 33.0) == []
    assert _tick(act, _running("a", preemptions=29), 34.0) == ["a"]


def test_silence_counts_from_when_the_engine_runs_the_request_again() -> None:
    """A request that waited in the engine's queue for a minute is not stalled the moment it runs again."""
    act = _Act("a", last_data_at=0.0)
    for t in range(1, 60):
        assert _tick(act, _running("a", status=EngineStatus.WAITING), float(t)) == []
    assert _tick(act, _running("a"), 60.0) == []
    assert _tick(act, _running("a"), 63.0) == []
    assert _tick(act, _running("a"), 64.0) == ["a"]
