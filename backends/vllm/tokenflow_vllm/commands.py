"""Validation of control commands (docs/engine-control-api.md), shared by the HTTP layer and the engine."""
from __future__ import annotations

import re
from typing import Any

OPS = ("preempt", "resume", "prefetch", "priority", "abort")
MAX_COMMANDS = 1024
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # use with fullmatch: "$" would let a trailing newline through


def error_result(req_id: Any, op: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": req_id, "op": op, "ok": False, "error": {"code": code, "message": message}}


def validate(cmd: Any) -> dict[str, Any] | None:
    """Return an ``invalid_command`` result for a malformed command, or None if it is well formed."""
    if not isinstance(cmd, dict):
        return error_result(None, None, "invalid_command", "a command must be a JSON object")
    req_id, op = cmd.get("id"), cmd.get("op")
    if op not in OPS:
        return error_result(req_id, op, "invalid_command", f"unknown op {op!r}")
    if not isinstance(req_id, str):
        return error_result(req_id, op, "invalid_command", "'id' must be a string")
    if op == "priority":
        p = cmd.get("priority")
        if isinstance(p, bool) or not isinstance(p, int):
            return error_result(req_id, op, "invalid_command", "'priority' must be an integer")
    return None


def not_found(req_id: str, op: str) -> dict[str, Any]:
    return error_result(req_id, op, "not_found", f"unknown request id '{req_id}'")
