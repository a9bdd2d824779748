"""Parse and validate OpenAI chat / completions requests into a :class:`ClientRequest`.

Only what the gateway itself needs is interpreted; every other OpenAI field passes through to the engine
unchanged. Each rejection names the offending field, in OpenAI's error format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ..config import StreamsConfig
from .errors import ApiError, invalid

Kind = Literal["chat", "completion"]

# Fields the gateway owns: clients may not set them for the engine.
_RESERVED = ("vllm_xargs", "priority", "n")


@dataclass(slots=True)
class ClientRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    rate: float
    rate_declared: bool
    pacing: Literal["smooth", "phrase", "none"]
    max_tokens: int | None
    engine_body: dict[str, Any]  # what is sent upstream (without gateway fields)


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise invalid("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", code="invalid_json")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rate(value: Any, where: str, cfg: StreamsConfig) -> float:
    if isinstance(value, str) and value in cfg.rate_classes:
        return cfg.rate_classes[value]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            classes = ", ".join(sorted(cfg.rate_classes))
            raise invalid(
                f"{where} must be a number of tokens/s or one of the rate classes: {classes}", param=where
            ) from None
    if not _is_number(value) or not math.isfinite(value):
        raise invalid(f"{where} must be a finite number of tokens/s", param=where)
    if not (cfg.min_rate <= value <= cfg.max_rate):
        raise invalid(f"{where} must be between {cfg.min_rate:g} and {cfg.max_rate:g} tokens/s, got {value:g}",
                      param=where)
    return float(value)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer", "function"):
            raise invalid(f"'messages[{i}].role' must be one of system, user, assistant, tool, developer",
                          param=f"messages[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid(f"'messages[{i}].content' must be a string or an array of content parts",
                          param=f"messages[{i}].content")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise invalid("only one prompt per request is supported", param="prompt")
            return
        if all(_is_int(p) and p >= 0 for p in prompt):
            return
    raise invalid("'prompt' must be a string, a one-element array of strings, or an array of token ids", param="prompt")


def parse_request(
    body: dict[str, Any],
    kind: Kind,
    headers: Any,
    cfg: StreamsConfig,
    known_models: set[str] | None,
) -> ClientRequest:
    """Validate ``body``; raise :class:`ApiError` (4xx) on anything malformed."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a string", param="model")
    if known_models is not None and model not in known_models:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; available: {', '.join(sorted(known_models))}",
            code="model_not_found",
            param="model",
        )
    if kind == "chat":
        _check_messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise invalid("'prompt' is required", param="prompt")
        _check_prompt(body["prompt"])

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", param="stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("'stream_options' must be an object", param="stream_options")
        iu = so.get("include_usage", False)
        if not isinstance(iu, bool):
            raise invalid("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
        include_usage = iu

    max_tokens: int | None = None
    for field in ("max_tokens", "max_completion_tokens"):
        if field in body and body[field] is not None:
            v = body[field]
            if not _is_int(v):
                raise invalid(f"'{field}' must be an integer", param=field)
            if v <= 0:
                raise invalid(f"'{field}' must be at least 1, got {v}", param=field)
            max_tokens = v if max_tokens is None else min(max_tokens, v)

    for field, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        if field in body and body[field] is not None:
            v = body[field]
            if not _is_number(v) or not (lo <= v <= hi):
                raise invalid(f"'{field}' must be a number between {lo:g} and {hi:g}", param=field)
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("only 'n': 1 is supported for streamed, paced answers", param="n")

    tf = body.get("tokenflow")
    if tf is not None and not isinstance(tf, dict):
        raise invalid("'tokenflow' must be an object like {\"rate\": 8.0, \"pacing\": \"smooth\"}", param="tokenflow")
    tf = tf or {}
    unknown = set(tf) - {"rate", "pacing"}
    if unknown:
        raise invalid(f"unknown field(s) in 'tokenflow': {', '.join(sorted(unknown))}", param="tokenflow")
    rate_declared = True
    if "rate" in tf and tf["rate"] is not None:
        rate = _rate(tf["rate"], "tokenflow.rate", cfg)
    elif headers.get("X-TokenFlow-Rate") is not None:
        rate = _rate(headers.get("X-TokenFlow-Rate"), "X-TokenFlow-Rate", cfg)
    else:
        rate, rate_declared = cfg.default_rate, False
    pacing = tf.get("pacing", headers.get("X-TokenFlow-Pacing", cfg.default_pacing))
    if pacing not in ("smooth", "phrase", "none"):
        raise invalid("'tokenflow.pacing' must be \"smooth\", \"phrase\" or \"none\"", param="tokenflow.pacing")

    engine_body = {k: v for k, v in body.items() if k != "tokenflow" and k not in _RESERVED}
    return ClientRequest(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        rate=rate,
        rate_declared=rate_declared,
        pacing=pacing,
        max_tokens=max_tokens,
        engine_body=engine_body,
    )
