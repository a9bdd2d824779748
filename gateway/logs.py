"""Structured logs: one JSON object per line, with stream id, engine and decision where known."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # a lone surrogate (undecodable bytes a client sent, quoted in a message): escaped
            return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    # The JSON lines carry none of the caller's file and line, thread or process, so a record need not look them
    # up (the logging HOWTO's "Optimization"): it saves about a fifth of a line's cost, and the control loop logs
    # every decision, hundreds a tick under overload.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class ProtocolErrorFilter(logging.Filter):
    """aiohttp logs every malformed request (an over-long header line, a bad request line) at ERROR with a full
    traceback, so any client could flood the logs. A client's protocol error is its own fault: this logs it
    once per connection (aiohttp closes the connection after one) as a WARNING without traceback, and at most
    ``burst`` lines per ``window_s``; the next line that gets through says how many were suppressed."""

    def __init__(self, burst: int = 10, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """A fresh window (and no suppressed count)."""
        self._window_start = -float("inf")
        self._in_window = 0
        self.suppressed = 0  # since the last line that got through

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True  # a real failure inside the server: logged as it is
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg, record.args = "client protocol error", ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.remote = remote
        record.status = getattr(exc, "code", 400)
        record.error = type(exc).__name__  # not its message: it quotes the offending line (an Authorization header)
        record.suppressed = self.suppressed
        self.suppressed = 0
        return True


def install_protocol_error_filter() -> None:
    """Once per process, on aiohttp's server logger."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ProtocolErrorFilter) for f in server.filters):
        server.addFilter(ProtocolErrorFilter())
