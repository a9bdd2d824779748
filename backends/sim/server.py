"""The simulated engine over HTTP: OpenAI completions/chat (SSE) plus the engine control API.

One :class:`WallClockEngine` runs one :class:`~backends.sim.core.EngineCore` on the event loop's clock:
an engine task schedules a step, sleeps until the step's absolute end (so steps do not drift), applies the
step, delivers the emitted tokens to per-request queues, then applies the control commands that arrived
meanwhile (commands act at step boundaries, as docs/engine-control-api.md says). With nothing to compute
it waits for new work, a command, or the end of a host->device load.

Embedding: ``running = await start_engine("sim-small")``; ``running.url``; ``await running.close()``.
Standalone: ``python -m backends.sim --profile sim-small --port 8100`` (also ``tokenflow engine-sim``).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .core import OPS, DuplicateId, Emitted, EngineCore
from .profile import Profile, ProfileError, load_profile

log = logging.getLogger("tokenflow.sim")

CONTROL_VERSION = "1"
CONTROL_HEADERS = {"X-TokenFlow-Control-Version": CONTROL_VERSION}
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_COMMANDS = 1024
DEFAULT_MAX_TOKENS = 256
# A step that starts this late after the previous one ended starts "now" instead of catching up.
MAX_CATCH_UP_S = 0.05
# Shared secret for /control/v1 (``--control-token`` or this variable); unset: the control API is open.
CONTROL_TOKEN_ENV = "TOKENFLOW_CONTROL_TOKEN"


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return _json(error_body(self.message, self.code, self.param, self.status), self.status, headers)


def error_body(message: str, code: str, param: str | None = None, status: int = 400) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "internal_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


# ---------------------------------------------------------------------------- the engine on the wall clock


class WallClockEngine:
    """An EngineCore driven by an asyncio task on the loop's monotonic clock."""

    def __init__(self, profile: Profile, *, default_max_tokens: int = DEFAULT_MAX_TOKENS, **core_kwargs: Any) -> None:
        self.profile = profile
        self.core = EngineCore(profile, default_max_tokens=default_max_tokens, **core_kwargs)
        self.queues: dict[str, asyncio.Queue[tuple[int, str | None]]] = {}
        self._pending: list[tuple[Callable[[float], Any], asyncio.Future[Any] | None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.clock_offset = time.time() - self._loop.time()
        self._task = self._loop.create_task(self._run(), name="sim-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for q in self.queues.values():
            q.put_nowait((-1, "abort"))
        self.queues.clear()

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # --- requests ---

    def submit(self, rid: str, prompt_tokens: int, max_tokens: int | None, priority: int) -> asyncio.Queue:
        """Queue a request; its tokens arrive on the returned queue as (index, finish_reason)."""
        self._check_alive()
        self.core.add(rid, prompt_tokens, max_tokens, priority, self.now())
        q: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        self.queues[rid] = q
        self._wake.set()
        return q

    def release(self, rid: str, q: asyncio.Queue | None) -> None:
        """The request's HTTP handler ended (done or client gone): abort it if still live. Never blocks."""
        if q is not None and self.queues.get(rid) is q:
            del self.queues[rid]
        if rid in self.core:
            self._at_boundary(lambda now: self.core.abort(rid) if self.queues.get(rid) is None else None)

    # --- control ---

    async def commands(self, cmds: list[Any]) -> list[dict[str, Any]]:
        """Apply validated commands at the next step boundary; one result per command, in order."""
        self._check_alive()
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._at_boundary(lambda now: [self._apply(c, now) for c in cmds], fut)
        return await fut

    def _apply(self, cmd: Any, now: float) -> dict[str, Any]:
        bad = validate_command(cmd)
        if bad is not None:
            return bad
        op, rid = cmd["op"], cmd["id"]
        res = self.core.command(op, rid, now, priority=cmd.get("priority"))
        if op == "abort" and res["ok"]:
            q = self.queues.pop(rid, None)
            if q is not None:
                q.put_nowait((-1, "abort"))
        return res

    def _at_boundary(self, fn: Callable[[float], Any], fut: asyncio.Future[Any] | None = None) -> None:
        if not self.healthy:
            if fut is not None:
                fut.set_exception(RuntimeError("engine loop is not running"))
            return
        if self.core.in_flight:
            self._pending.append((fn, fut))
        else:
            self._call(fn, fut, self.now())
        self._wake.set()

    @staticmethod
    def _call(fn: Callable[[float], Any], fut: asyncio.Future[Any] | None, now: float) -> None:
        try:
            res = fn(now)
        except Exception as e:  # a bug must not kill the engine loop
            log.exception("control command failed")
            if fut is not None and not fut.done():
                fut.set_exception(e)
            return
        if fut is not None and not fut.done():
            fut.set_result(res)

    def _drain_pending(self, now: float) -> None:
        pending, self._pending = self._pending, []
        for fn, fut in pending:
            self._call(fn, fut, now)

    # --- the loop ---

    def _check_alive(self) -> None:
        if not self.healthy:
            raise ApiError(503, "the simulated engine loop is not running", "engine_unavailable")

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except BaseException:
            # A bug in the core: say so loudly, end every open stream instead of leaving it hanging.
            log.exception("simulated engine loop failed; /health now reports 503")
            for q in self.queues.values():
                q.put_nowait((-1, "abort"))
            self.queues.clear()
            for _, fut in self._pending:
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError("engine loop failed"))
            self._pending.clear()
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        last_end: float | None = None
        while True:
            self._wake.clear()
            now = loop.time()
            t = last_end if last_end is not None and now - last_end <= MAX_CATCH_UP_S else now
            self._drain_pending(t)
            step = core.next_step(t)
            if step is None:
                last_end = None
                ev = core.next_event_time()
                timeout = None if ev is None else max(0.0, ev - loop.time())
                if timeout is None or timeout > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except TimeoutError:
                        pass
                continue
            end = t + step.duration
            try:
                delay = end - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            finally:
                emitted = core.complete_step(step, end)
            last_end = end
            self._deliver(emitted)

    def _deliver(self, emitted: list[Emitted]) -> None:
        queues = self.queues
        for e in emitted:
            q = queues.get(e.id)
            if q is not None:
                q.put_nowait((e.position, e.finish_reason))
                if e.finish_reason is not None:
                    del queues[e.id]


def validate_command(cmd: Any) -> dict[str, Any] | None:
    """An invalid_command result for a malformed command, else None."""
    if not isinstance(cmd, dict):
        return {"id": None, "op": None, "ok": False,
                "error": {"code": "invalid_command", "message": "a command must be an object"}}
    op, rid = cmd.get("op"), cmd.get("id")
    msg = None
    if not isinstance(op, str) or op not in OPS:
        msg = f"unknown op {op!r}; expected one of {list(OPS)}"
    elif not isinstance(rid, str) or not rid:
        msg = "'id' must be a non-empty string"
    elif op == "priority" and (isinstance(cmd.get("priority"), bool) or not isinstance(cmd.get("priority"), int)):
        msg = "'priority' must be an integer"
    if msg is None:
        return None
    return {"id": rid if isinstance(rid, str) else None, "op": op if isinstance(op, str) else None, "ok": False,
            "error": {"code": "invalid_command", "message": msg}}


# ---------------------------------------------------------------------------- OpenAI request parsing


@dataclass(slots=True)
class GenRequest:
    rid: str
    prompt_tokens: int
    max_tokens: int | None
    priority: int
    stream: bool
    include_usage: bool
    chat: bool
    model: str
    offset: int = 0  # index of the first output token (a continuation of this simulator's own output)


_LAST_TOKEN = re.compile(r" tok(\d+)$")


def continued_offset(text: str) -> int:
    """Where a continuation of this simulator's output resumes numbering: after the last `` tok<i>`` it ends with.

    A gateway resubmits a stream as prompt + output so far (completions) or with the output as a final
    assistant message to continue (chat); the synthetic sequence then goes on where it stopped.
    """
    m = _LAST_TOKEN.search(text)
    return int(m.group(1)) + 1 if m else 0


def text_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: about four characters per token."""
    return max(1, math.ceil(len(text) / 4))


def _int_field(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer", "invalid_value", name)
    if lo is not None and v < lo:
        raise ApiError(400, f"'{name}' must be >= {lo}", "invalid_value", name)
    return v


def parse_request(body: Any, chat: bool, default_model: str) -> GenRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_body")
    model = body.get("model", default_model)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "invalid_value", "model")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
        prompt_tokens = 0
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a string 'role'", "invalid_value", "messages")
            content = m.get("content")
            if isinstance(content, str):
                prompt_tokens += text_tokens(content)
            elif isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                    raise ApiError(400, "message content parts must be text parts", "invalid_value", "messages")
                prompt_tokens += text_tokens("".join(parts))  # type: ignore[arg-type]
            elif content is None:
                prompt_tokens += 1
            else:
                raise ApiError(400, "message 'content' must be a string or a list of parts", "invalid_value",
                               "messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            prompt_tokens = text_tokens(prompt)
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
            prompt_tokens = len(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids", "invalid_value",
                           "prompt")
    max_tokens = _int_field(body, "max_tokens", 1)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int_field(body, "max_completion_tokens", 1)
    n = _int_field(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "only n = 1 is supported", "invalid_value", "n")
    priority = _int_field(body, "priority") or 0
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "invalid_value", "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise ApiError(400, "'stream_options' must be an object", "invalid_value", "stream_options")
        iu = so.get("include_usage", False)
        if not isinstance(iu, bool):
            raise ApiError(400, "'stream_options.include_usage' must be a boolean", "invalid_value",
                           "stream_options")
        include_usage = iu
    xargs = body.get("vllm_xargs")
    rid = None
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise ApiError(400, "'vllm_xargs' must be an object", "invalid_value", "vllm_xargs")
        rid = xargs.get("tokenflow_id")
        if rid is not None and (not isinstance(rid, str) or not ID_RE.fullmatch(rid)):
            raise ApiError(400, "'vllm_xargs.tokenflow_id' must match [A-Za-z0-9._-]{1,128}", "invalid_value",
                           "vllm_xargs")
    if rid is None:
        rid = "sim-" + uuid.uuid4().hex
    offset = 0
    if chat:
        last = body["messages"][-1]
        continuing = body.get("continue_final_message") is True or body.get("add_generation_prompt") is False
        if continuing and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            offset = continued_offset(last["content"])
    elif isinstance(body.get("prompt"), str):
        offset = continued_offset(body["prompt"])
    return GenRequest(rid, prompt_tokens, max_tokens, priority, stream, include_usage, chat, model, offset)


# ---------------------------------------------------------------------------- responses


def token_text(index: int) -> str:
    """The synthetic output: token ``i`` is the word `` tok<i>``, so order and completeness are checkable."""
    return f" tok{index}"


def _chunk(g: GenRequest, created: int, index: int | None, finish: str | None) -> bytes:
    first = index == 0
    if index is not None:
        index += g.offset
    text = token_text(index) if index is not None else ""
    ids = [index] if index is not None else []
    if g.chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta = {"role": "assistant", "content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}
        obj = {"id": f"chatcmpl-{g.rid}", "object": "chat.completion.chunk", "created": created, "model": g.model,
               "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}
        obj = {"id": f"cmpl-{g.rid}", "object": "text_completion", "created": created, "model": g.model,
               "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(g: GenRequest, completion: int) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": completion,
            "total_tokens": g.prompt_tokens + completion}


# ---------------------------------------------------------------------------- the app


ENGINE_KEY: web.AppKey[WallClockEngine] = web.AppKey("sim_engine", WallClockEngine)


def create_app(profile: Profile | str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               control_token: str | None = None, **core_kwargs: Any) -> web.Application:
    """An aiohttp app serving one simulated engine; the engine task starts with the app.

    With ``control_token``, every /control/v1 request must carry ``Authorization: Bearer <token>`` (else 401).
    """
    prof = load_profile(profile) if isinstance(profile, str) else profile
    engine = WallClockEngine(prof, default_max_tokens=default_max_tokens, **core_kwargs)
    middlewares = [_errors] + ([_control_auth(control_token)] if control_token else [])
    app = web.Application(client_max_size=8 * 1024 * 1024, middlewares=middlewares)
    app[ENGINE_KEY] = engine

    async def on_startup(app: web.Application) -> None:
        engine.start()

    async def on_cleanup(app: web.Application) -> None:
        await engine.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_post("/v1/completions", _completions)
    r.add_post("/v1/chat/completions", _chat)
    r.add_get("/v1/models", _models)
    r.add_get("/health", _health)
    r.add_get("/metrics", _metrics)
    r.add_get("/control/v1/state", _state)
    r.add_post("/control/v1/commands", _commands)
    r.add_get("/control/v1/requests/{id}", _request_state)
    r.add_post("/control/v1/requests/{id}/{op}", _single_command)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    headers = CONTROL_HEADERS if request.path.startswith("/control/") else None
    try:
        return await handler(request)
    except ApiError as e:
        return e.response(headers)
    except web.HTTPException as e:
        if e.status >= 400:
            return _json(error_body(e.reason or "error", "not_found" if e.status == 404 else "http_error",
                                    status=e.status), e.status, headers)
        raise


def _control_auth(token: str) -> Callable[..., Any]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path.startswith("/control/"):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                body = error_body("missing or wrong control token", "unauthorized", status=401)
                body["error"]["type"] = "authentication_error"
                return _json(body, 401, {**CONTROL_HEADERS, "WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON", "invalid_json") from None


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    g = parse_request(await _read_json(request), chat, engine.profile.model_name)
    mml = engine.profile.max_model_len
    if g.prompt_tokens >= mml or (g.max_tokens is not None and g.prompt_tokens + g.max_tokens > mml):
        raise ApiError(400, f"This model's maximum context length is {mml} tokens; the request has "
                            f"{g.prompt_tokens} prompt tokens and max_tokens {g.max_tokens}", "context_length_exceeded",
                       "max_tokens" if g.prompt_tokens < mml else "prompt")
    try:
        q = engine.submit(g.rid, g.prompt_tokens, g.max_tokens, g.priority)
    except DuplicateId as e:
        raise ApiError(400, str(e), "duplicate_id", "vllm_xargs") from None
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_value") from None
    created = int(time.time())
    try:
        if g.stream:
            return await _stream(request, g, q, created)
        ids: list[int] = []
        while True:
            index, finish = await q.get()
            if index >= 0:
                ids.append(index + g.offset)
            if finish is not None:
                break
        text = "".join(token_text(i) for i in ids)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish, "token_ids": ids}
            obj = {"id": f"chatcmpl-{g.rid}", "object": "chat.completion", "created": created, "model": g.model,
                   "choices": [choice], "usage": _usage(g, len(ids))}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}
            obj = {"id": f"cmpl-{g.rid}", "object": "text_completion", "created": created, "model": g.model,
                   "choices": [choice], "usage": _usage(g, len(ids))}
        return _json(obj)
    finally:
        # Runs on normal completion and when the handler is cancelled because the client went away.
        engine.release(g.rid, q)


async def _stream(request: web.Request, g: GenRequest, q: asyncio.Queue, created: int) -> web.StreamResponse:
    """Write the request's tokens as SSE chunks, one token per chunk."""
    chat = g.chat
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        n = 0
        while True:
            index, finish = await q.get()
            if index >= 0:
                n += 1
                await resp.write(_chunk(g, created, index, finish))
            else:
                await resp.write(_chunk(g, created, None, finish))
            if finish is not None:
                break
        if g.include_usage:
            obj: dict[str, Any] = {"id": ("chatcmpl-" if chat else "cmpl-") + g.rid,
                   "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": g.model, "choices": [], "usage": _usage(g, n)}
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except ConnectionResetError:
        # The client went away mid-write; the caller's finally clause aborts the request.
        return resp


async def _models(request: web.Request) -> web.Response:
    p = request.app[ENGINE_KEY].profile
    return _json({"object": "list", "data": [{
        "id": p.model_name, "object": "model", "created": 0, "owned_by": "tokenflow-simulator",
        "root": p.model_name, "max_model_len": p.max_model_len, "simulated": True, "profile": p.name}]})


async def _health(request: web.Request) -> web.Response:
    if not request.app[ENGINE_KEY].healthy:
        return web.Response(status=503, text="engine loop is not running")
    return web.Response(text="ok")


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    engine = request.app[ENGINE_KEY]
    st = engine.core.state(engine.now())["engine"]
    reg = CollectorRegistry()
    for key in ("num_running", "num_waiting", "num_held", "num_loading", "num_parked",
                "kv_device_used_tokens", "kv_host_used_tokens"):
        Gauge(f"tokenflow_sim_{key}", key.replace("_", " "), registry=reg).set(st[key])
    g = Gauge("tokenflow_sim_events_total", "engine counters since start", ["event"], registry=reg)
    for k, v in st["counters"].items():
        g.labels(k).set(v)
    Gauge("tokenflow_sim_steps_total", "engine steps since start", registry=reg).set(engine.core.steps)
    return web.Response(body=generate_latest(reg), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def _state(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    # a control read: with the profile's engine.state_s_per_held it costs the engine's next step time
    return _json(engine.core.read_state(engine.now()), headers=CONTROL_HEADERS)


async def _request_state(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    rid = request.match_info["id"]
    obj = engine.core.request_state(rid, engine.now())
    if obj is None:
        raise ApiError(404, f"unknown request id '{rid}'", "not_found")
    return _json(obj, headers=CONTROL_HEADERS)


async def _commands(request: web.Request) -> web.Response:
    body = await _read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("commands"), list):
        raise ApiError(400, "body must be an object with a 'commands' list", "invalid_body", "commands")
    cmds = body["commands"]
    if len(cmds) > MAX_COMMANDS:
        raise ApiError(400, f"at most {MAX_COMMANDS} commands per call", "too_many_commands", "commands")
    results = await request.app[ENGINE_KEY].commands(cmds)
    return _json({"results": results}, headers=CONTROL_HEADERS)


async def _single_command(request: web.Request) -> web.Response:
    rid, op = request.match_info["id"], request.match_info["op"]
    if op not in OPS:
        raise ApiError(404, f"unknown command '{op}'", "not_found")
    cmd: dict[str, Any] = {"op": op, "id": rid}
    if op == "priority":
        body = await _read_json(request)
        if not isinstance(body, dict) or isinstance(body.get("priority"), bool) or not isinstance(
                body.get("priority"), int):
            raise ApiError(400, "body must be {\"priority\": int}", "invalid_value", "priority")
        cmd["priority"] = body["priority"]
    (res,) = await request.app[ENGINE_KEY].commands([cmd])
    if not res["ok"]:
        code = res["error"]["code"]
        raise ApiError(404 if code == "not_found" else 400, res["error"]["message"], code)
    return _json(res, headers=CONTROL_HEADERS)


# ---------------------------------------------------------------------------- embedding and CLI


class RunningEngine:
    """A simulated engine serving on a local port inside the current event loop."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, url: str, engine: WallClockEngine) -> None:
        self._runner, self._site, self.url, self.engine = runner, site, url, engine

    @property
    def core(self) -> EngineCore:
        return self.engine.core

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_engine(profile: Profile | str, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
                       ) -> RunningEngine:
    """Start a simulated engine in the running event loop; ``port=0`` picks a free port."""
    app = create_app(profile, **kwargs)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = runner.addresses
    bound_port = sockets[0][1] if sockets else port
    url_host = f"[{host}]" if ":" in host else host
    return RunningEngine(runner, site, f"http://{url_host}:{bound_port}", app[ENGINE_KEY])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenflow engine-sim",
                                 description="Serve a simulated LLM engine (OpenAI API + engine control API v1).")
    ap.add_argument("--profile", default="sim-small", help="profile name in configs/profiles, or a YAML path")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help="output limit for requests without max_tokens")
    ap.add_argument("--engine-preempt", choices=("recompute", "offload"), default="recompute",
                    help="what the engine's own KV-pressure preemption does with the victim's KV")
    ap.add_argument("--no-write-through", action="store_true", help="disable the host KV tier")
    ap.add_argument("--control-token", default=os.environ.get(CONTROL_TOKEN_ENV) or None,
                    help=f"bearer token the control API requires (default: ${CONTROL_TOKEN_ENV}; unset: open)")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ProfileError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        pass
    app = create_app(profile, default_max_tokens=args.default_max_tokens, engine_preempt=args.engine_preempt,
                     write_through=not args.no_write_through, control_token=args.control_token)
    print(f"simulated engine '{profile.name}' (model {profile.model_name}) on http://{args.host}:{args.port}",
          flush=True)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True, access_log=None, print=None)
    return 0
