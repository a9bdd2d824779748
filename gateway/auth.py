"""API keys for the client API: bearer-token check, per-key stream limits, per-key default rate, access log.

Keys are held only as SHA-256 digests, so the configured secrets are not kept in memory in clear and a
lookup's timing says nothing about how much of a guessed key was right. Keys are never logged: logs and
metrics name a key by its configured ``name``.

Every request that generates (``POST /v1/chat/completions``, ``/v1/completions``) holds one of its key's
stream slots for as long as its handler runs, which for a streamed answer is until the last byte is sent
or the client goes away, so the limit is on concurrent streams (non-streamed answers included).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .api.errors import ApiError, at_capacity
from .api.requests import ClientRequest
from .config import ApiKeyConfig, AuthConfig, StreamsConfig
from .metrics import Metrics

log = logging.getLogger("tokenflow.access")

GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
KEY_ATTR: web.RequestKey[ApiKey] = web.RequestKey("tokenflow_key", object)  # type: ignore[arg-type]  # absent: no keys
ENGINE_ATTR: web.RequestKey[str] = web.RequestKey("tokenflow_engine", str)  # the engine a generation request went to
STREAM_ATTR: web.RequestKey[str] = web.RequestKey("tokenflow_stream_id", str)  # its stream id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class ApiKey:
    name: str
    rate_class: str | None
    max_streams: int | None
    admin: bool = False
    active: int = 0


def digest(key: str) -> bytes:
    # surrogateescape: a header value that is not UTF-8 reaches here with its bytes escaped (aiohttp decodes
    # headers so); it is hashed as the bytes that were sent, and matches no configured key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyStore:
    def __init__(self, keys: list[ApiKeyConfig]) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        for k in keys:
            d = digest(k.key.get_secret_value()) if k.key is not None else bytes.fromhex(k.key_sha256 or "")
            self._by_digest[d] = ApiKey(k.name, k.rate_class, k.max_streams, k.admin)

    @property
    def required(self) -> bool:
        return bool(self._by_digest)

    def entries(self) -> list[ApiKey]:
        return list(self._by_digest.values())

    def lookup(self, authorization: str | None) -> ApiKey:
        """The key named by an ``Authorization`` header value; ApiError 401 (OpenAI format) otherwise."""
        if not authorization:
            raise _unauthorized(
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY).",
                "missing_api_key",
            )
        scheme, _, token = authorization.strip().partition(" ")
        key = self._by_digest.get(digest(token.strip())) if scheme.lower() == "bearer" and token.strip() else None
        if key is None:
            raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
        return key


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code=code, headers={"WWW-Authenticate": "Bearer"})


def auth_middleware(cfg: AuthConfig, metrics: Metrics) -> Middleware:
    """The middleware (register it inside the error middleware, which turns ApiError into the response)."""
    store = KeyStore(cfg.all_keys())
    for k in store.entries():
        metrics.key_streams_active.labels(k.name).set(0)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.monotonic()
        key: ApiKey | None = None
        status = 500
        acquired = False
        try:
            if store.required and request.path.startswith("/v1/"):
                key = store.lookup(request.headers.get("Authorization"))
                request[KEY_ATTR] = key
                if request.method == "POST" and request.path in GENERATE_PATHS:
                    if key.max_streams is not None and key.active >= key.max_streams:
                        raise at_capacity(
                            f"API key '{key.name}' is at its limit of {key.max_streams} concurrent streams; "
                            "retry shortly",
                            "key_stream_limit", cfg.retry_after_s,
                        )
                    key.active += 1
                    acquired = True
                    metrics.key_streams_active.labels(key.name).set(key.active)
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.status
            raise
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        finally:
            if acquired and key is not None:
                key.active -= 1
                metrics.key_streams_active.labels(key.name).set(key.active)
            _access_log(request, key, status, time.monotonic() - t0)

    return middleware


def _access_log(request: web.Request, key: ApiKey | None, status: int, duration: float) -> None:
    level = logging.INFO if request.path.startswith("/v1/") else logging.DEBUG
    if status >= 500:
        level = logging.WARNING
    if not log.isEnabledFor(level):
        return
    extra: dict[str, object] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_s": round(duration, 6),
        "key": key.name if key is not None else None,
    }
    if request.path in GENERATE_PATHS:
        extra["stream_id"] = request.get(STREAM_ATTR)
        extra["engine"] = request.get(ENGINE_ATTR)
    log.log(level, "request", extra=extra)


def key_name(request: web.Request) -> str | None:
    """The name of the API key that authenticated ``request`` (None when the gateway runs without keys)."""
    key = request.get(KEY_ATTR)
    return None if key is None else key.name


def may_see(request: web.Request, owner: str | None) -> bool:
    """Whether ``request``'s key may see the live state of a stream started with key ``owner``: its own, or any
    with an admin key (without keys configured, every request may)."""
    key: ApiKey | None = request.get(KEY_ATTR)
    return key is None or key.admin or key.name == owner


def admit(request: web.Request, creq: ClientRequest, engine: str, stream_id: str, streams: StreamsConfig) -> None:
    """Hook called once a generation request is parsed, routed and named: the key's default rate, log fields."""
    request[ENGINE_ATTR] = engine
    request[STREAM_ATTR] = stream_id
    key: ApiKey | None = request.get(KEY_ATTR)
    if key is not None and key.rate_class is not None and not creq.rate_declared:
        creq.rate = streams.rate_classes[key.rate_class]

