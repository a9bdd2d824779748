"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson
from aiohttp import web


class ApiError(Exception):
    """An error answered to the client; never a 500 for bad input."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Messages may quote what the client sent; aiohttp decodes header bytes that are not UTF-8 to lone
        # surrogates, which no JSON encoder writes: shown escaped instead.
        message = text_safe(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=orjson.dumps(self.body()), content_type="application/json", headers=self.headers
        )


def text_safe(s: str) -> str:
    """``s`` with any lone surrogate (undecodable input bytes) written as a ``\\udcXX`` escape."""
    return s if s.isascii() else s.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", code=code, param=param)


def at_capacity(message: str, code: str, retry_after_s: int) -> ApiError:
    """429: a stream limit is reached (the gateway's, an engine's or an API key's); retry after a while."""
    return ApiError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(retry_after_s)})
