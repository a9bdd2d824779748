"""Endpoint plugin (entry point ``vllm.endpoint_plugins: tokenflow_control``): the control API.

Serves docs/engine-control-api.md on the ``vllm serve`` HTTP server, beside the OpenAI API:

- ``POST /control/v1/commands`` (batched), ``POST /control/v1/requests/{id}/{op}`` (single command),
  ``GET /control/v1/state``, ``GET /control/v1/requests/{id}``;
- an ASGI middleware on the OpenAI endpoints that checks ``vllm_xargs.tokenflow_id`` (format, ``n == 1``)
  and rejects a second live request with the same id (``400 duplicate_id``).

Commands and state go to the scheduler through one EngineCore utility call (see ``engine_hook``).
Aborts are applied by the scheduler in order with the other commands; the API server then finishes
the aborted requests' output streams (``finish_reason: "abort"``).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from tokenflow_vllm import commands as cmds
from tokenflow_vllm.engine_hook import UTILITY

log = logging.getLogger("tokenflow_vllm.endpoints")

VERSION_HEADER = {"X-TokenFlow-Control-Version": "1"}
TOKEN_ENV = "TOKENFLOW_CONTROL_TOKEN"
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")
SINGLE_OPS = ("preempt", "resume", "prefetch", "abort", "priority")


def openai_error(status: int, message: str, code: str, param: str | None = None, type_: str | None = None):
    type_ = type_ or ("not_found_error" if status == 404 else "invalid_request_error")
    body = {"error": {"message": message, "type": type_, "code": code, "param": param}}
    return JSONResponse(body, status_code=status)


class ControlError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ---------------------------------------------------------------------------------------------- engine


async def _engine_call(request: Request, msg: dict[str, Any]) -> dict[str, Any]:
    client = getattr(request.app.state, "tokenflow_engine", None)
    core = getattr(client, "engine_core", None)
    if core is None:
        raise ControlError(503, "no engine behind this server", "engine_unavailable")
    try:
        raw = await core.call_utility_async(UTILITY, json.dumps(msg))
    except Exception as e:  # engine dead or utility missing
        log.exception("control call failed")
        raise ControlError(503, f"engine control call failed: {type(e).__name__}: {e}", "engine_unavailable") from e
    out = json.loads(raw)
    if "error" in out and isinstance(out["error"], str):
        raise ControlError(503, out["error"], "engine_misconfigured")
    return out


async def _apply(request: Request, commands: list[Any]) -> list[dict[str, Any]]:
    out = await _engine_call(request, {"kind": "commands", "commands": commands})
    aborted = out.get("aborted_request_ids") or []
    if aborted:
        # The scheduler already freed them; this ends their output streams with finish_reason "abort"
        # (and repeats the abort to the engine, where it is a no-op).
        await request.app.state.tokenflow_engine.abort(aborted, internal=True)
    return out["results"]


def _public(req_state: dict[str, Any]) -> dict[str, Any]:
    req_state.pop("request_id", None)
    return req_state


# ---------------------------------------------------------------------------------------------- routes

router = APIRouter()


def _authorized(request: Request) -> bool:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return True
    got = request.headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


def _guard(handler):
    async def wrapped(request: Request, **kw):
        if not _authorized(request):
            return openai_error(401, "missing or wrong control token", "unauthorized", type_="authentication_error")
        try:
            return await handler(request, **kw)
        except ControlError as e:
            return openai_error(e.status, e.message, e.code, type_="server_error" if e.status >= 500 else None)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@router.post("/control/v1/commands")
async def post_commands(request: Request):
    """Apply a batch of commands, in order, at the engine's next step boundary."""

    async def run(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "body is not valid JSON", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("commands"), list):
            return openai_error(400, "body must be an object with a 'commands' list", "invalid_body", "commands")
        if len(body["commands"]) > cmds.MAX_COMMANDS:
            return openai_error(400, f"at most {cmds.MAX_COMMANDS} commands per call", "too_many_commands", "commands")
        return JSONResponse({"results": await _apply(request, body["commands"])})

    return await _guard(run)(request)


@router.post("/control/v1/requests/{req_id}/{op}")
async def post_single(request: Request, req_id: str, op: str):
    """One command by hand: 200 with its result, 404 for an unknown id."""

    async def run(request: Request):
        if op not in SINGLE_OPS:
            return openai_error(404, f"unknown operation {op!r}", "unknown_op", "op")
        cmd: dict[str, Any] = {"op": op, "id": req_id}
        if op == "priority":
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                return openai_error(400, "body is not valid JSON", "invalid_json")
            if not isinstance(body, dict):
                return openai_error(400, "body must be {\"priority\": int}", "invalid_body", "priority")
            cmd["priority"] = body.get("priority")
        (result,) = await _apply(request, [cmd])
        if result["ok"]:
            return JSONResponse(result)
        code = result["error"]["code"]
        status = 404 if code == "not_found" else 400 if code == "invalid_command" else 500
        result["error"]["type"] = "not_found_error" if status == 404 else "invalid_request_error"
        result["error"]["param"] = "id" if status == 404 else None
        return JSONResponse(result, status_code=status)

    return await _guard(run)(request)


@router.get("/control/v1/state")
async def get_state(request: Request):
    """Engine and per-request state; carries the contract version header."""

    async def run(request: Request):
        state = await _engine_call(request, {"kind": "state"})
        state["requests"] = [_public(r) for r in state["requests"]]
        return JSONResponse(state, headers=VERSION_HEADER)

    return await _guard(run)(request)


@router.get("/control/v1/requests/{req_id}")
async def get_request(request: Request, req_id: str):
    async def run(request: Request):
        out = await _engine_call(request, {"kind": "state", "id": req_id})
        if out.get("request") is None:
            return openai_error(404, f"unknown request id '{req_id}'", "not_found", "id")
        return JSONResponse(_public(out["request"]), headers=VERSION_HEADER)

    return await _guard(run)(request)


# ---------------------------------------------------------------------------------------------- ids


class TokenFlowIdMiddleware:
    """Checks ``vllm_xargs.tokenflow_id`` on OpenAI requests and keeps ids unique among live requests.

    Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client-disconnect detection, which
    aborts the request in the engine, pass through untouched. A request is live from the moment it is
    accepted here until its response has been sent or the client went away.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.live: set[str] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in OPENAI_PATHS:
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client left before sending its body
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        tf_id, error = self._check(body)
        if error is not None:
            return await error(scope, receive, send)
        if tf_id is not None:
            self.live.add(tf_id)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if tf_id is not None:
                self.live.discard(tf_id)

    def _check(self, body: bytes):
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None, None  # vLLM answers malformed bodies itself
        if not isinstance(data, dict):
            return None, None
        if "stream" in data and not isinstance(data["stream"], bool):
            # vLLM's lax parsing would read "yes" as true; the gateway's contract wants a 400.
            return None, openai_error(400, "'stream' must be a boolean", "invalid_type", "stream")
        if not isinstance(data.get("vllm_xargs"), dict):
            return None, None
        tf_id = data["vllm_xargs"].get("tokenflow_id")
        if tf_id is None:
            return None, None
        if not isinstance(tf_id, str) or not cmds.ID_RE.fullmatch(tf_id):
            return None, openai_error(
                400, "vllm_xargs.tokenflow_id must match [A-Za-z0-9._-]{1,128}", "invalid_id", "vllm_xargs.tokenflow_id"
            )
        if data.get("n", 1) not in (1, None):
            return None, openai_error(400, "requests with a tokenflow_id must use n = 1", "invalid_n", "n")
        if tf_id in self.live:
            return None, openai_error(400, f"request id '{tf_id}' is already live", "duplicate_id",
                                      "vllm_xargs.tokenflow_id")
        return tf_id, None


# ---------------------------------------------------------------------------------------------- plugin


class TokenFlowControlPlugin:
    name = "tokenflow_control"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(TokenFlowIdMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        state.tokenflow_engine = engine_client


def plugin() -> TokenFlowControlPlugin:
    return TokenFlowControlPlugin()
