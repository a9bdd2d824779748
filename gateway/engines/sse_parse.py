"""Parsing an engine's OpenAI SSE stream: ``data:`` lines to deltas. Shared by the engine client and its
streaming protocol; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


class EngineError(Exception):
    """The engine failed or answered with an error."""

    def __init__(self, message: str, status: int = 502, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(slots=True)
class Delta:
    text: str
    tokens: int
    finish_reason: str | None
    usage: dict[str, int] | None


def parse_lines(lines: list[bytes], chat: bool) -> tuple[list[Delta], bool]:
    """The deltas of the ``data:`` lines among ``lines``, and whether ``[DONE]`` was among them."""
    out: list[Delta] = []
    for line in lines:
        if not line.startswith(b"data:"):
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return out, True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise EngineError("engine sent a malformed stream chunk") from None
        if "error" in obj:
            raise EngineError(_error_message(obj) or "engine error", body=obj)
        usage = obj.get("usage")
        choices = obj.get("choices")
        if not choices:
            if usage:
                out.append(Delta("", 0, None, usage))
            continue
        c = choices[0]
        if chat:
            text = (c.get("delta") or {}).get("content") or ""
        else:
            text = c.get("text") or ""
        ids = c.get("token_ids")
        out.append(Delta(text, len(ids) if ids is not None else (1 if text else 0), c.get("finish_reason"), usage))
    return out, False


def _error_message(obj: Any) -> str | None:
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return obj["message"]
    return None
