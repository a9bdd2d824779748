"""Resubmitting a stream to its engine after the request died: prompt + what was produced, continued.

The engine aborts a request when its HTTP connection closes, so a stream whose reading replica died (or
whose client left and came back) is continued by a new request: for completions the prompt becomes the
original prompt followed by the text produced so far; for chat an assistant message with that text is
appended and continued (``continue_final_message: true, add_generation_prompt: false``, as vLLM supports).
``max_tokens`` shrinks by what was produced. With prefix caching the engine recomputes little.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .streams.tokens import Delta, tokens_in

_LIMITS = ("max_tokens", "max_completion_tokens")


class NotResumable(Exception):
    """The request cannot be continued (for example a token-id prompt without the produced token ids)."""


def parse_event_id(value: str) -> tuple[str, int]:
    """``<stream id>:<tokens delivered>`` (the SSE ``id:`` the gateway sends) -> (stream id, tokens)."""
    sid, sep, n = value.strip().rpartition(":")
    if not sep or not sid or not (n.isascii() and n.isdigit()) or len(n) > 12:  # (isdigit alone takes '²')
        raise ValueError(f"Last-Event-ID must be '<stream id>:<tokens>', got {value[:80]!r}")
    return sid, int(n)


def continuation_body(kind: str, body: dict[str, Any], deltas: Sequence[Delta]) -> dict[str, Any] | None:
    """The engine request that continues ``body`` after ``deltas``; None when nothing is left to generate."""
    produced = tokens_in(deltas)
    out = copy.deepcopy(body)
    if produced == 0:
        return out
    for k in _LIMITS:
        if isinstance(out.get(k), int):
            out[k] -= produced
            if out[k] <= 0:
                return None
    text = "".join(d[1] for d in deltas)
    if kind == "chat":
        msgs = list(out.get("messages") or [])
        if out.get("continue_final_message") and msgs and msgs[-1].get("role") == "assistant":
            last = dict(msgs[-1])
            last["content"] = (last.get("content") or "") + text
            msgs[-1] = last
        else:
            msgs.append({"role": "assistant", "content": text})
        out["messages"] = msgs
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
        return out
    prompt: Any = out.get("prompt")
    batch = isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list))
    inner = prompt[0] if batch else prompt
    if isinstance(inner, str):
        inner = inner + text
    elif isinstance(inner, list):
        ids = [i for d in deltas for i in (d[2] or ())]
        if len(ids) != produced:
            raise NotResumable("a token-id prompt is continued with token ids, which the engine did not return")
        inner = inner + ids
    else:
        raise NotResumable("the prompt cannot be continued")
    out["prompt"] = [inner] if batch else inner
    return out
