"""Parsing an engine's OpenAI SSE stream: ``data:`` lines to deltas. Shared by the engine client and its
streaming protocol; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


class EngineError(Exception):
    """The engine failed or answered with an error: the one exception type the engine client raises.

    ``status`` is what the gateway answers its own client with: the engine's 4xx passed on (the request's
    fault), 502 for a bad or broken answer, 503 when the engine cannot be reached, 504 on a timeout.
    """

    def __init__(self, message: str, status: int = 502, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def code(self) -> str | None:
        """The error code in the engine's answer, if it sent one (for example ``duplicate_id``)."""
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err.get("code") if isinstance(err, dict) else None


class EngineUnreachable(EngineError):
    """The engine could not be reached, or the connection failed (a transport error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


class EngineTimeout(EngineError, TimeoutError):
    """The engine did not answer in time (a control call, or a stream past its request timeout)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504)


class EngineDown(EngineUnreachable):
    """The engine is marked down (its control API stopped answering): new requests fail at once, and its
    streams that went silent end with this error."""


class EngineStalled(EngineTimeout):
    """A stream's engine reports the request running, yet sent nothing on it for longer than the engine's
    ``stall_timeout_s``."""


@dataclass(slots=True)
class EngineDelta:
    """What one event of the engine's stream said (not to be confused with the token log's ``Delta``)."""

    text: str
    tokens: int
    finish_reason: str | None
    usage: dict[str, int] | None


def parse_lines(lines: list[bytes], chat: bool) -> tuple[list[EngineDelta], bool]:
    """The deltas of the ``data:`` lines among ``lines``, and whether ``[DONE]`` was among them."""
    out: list[EngineDelta] = []
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
                out.append(EngineDelta("", 0, None, usage))
            continue
        c = choices[0]
        text = ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
        ids = c.get("token_ids")
        tokens = len(ids) if ids is not None else (1 if text else 0)
        out.append(EngineDelta(text, tokens, c.get("finish_reason"), usage))
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
