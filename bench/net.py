"""Local ports and HTTP readiness for the processes a benchmark (or a test) starts."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, deadline_s: float = 30.0, ok: tuple[int, ...] = (200,)) -> None:
    """Until ``url`` answers with one of ``ok``; RuntimeError after ``deadline_s``."""
    end = time.time() + deadline_s
    last: Exception | None = None
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up: {last}")


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url + "/health"`` answers 200 now."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_started(proc: subprocess.Popen[Any], ready: Callable[[], bool], *, what: str, url: str, timeout_s: float,
                 interval_s: float = 0.1, detail: Callable[[], str] = lambda: "") -> None:
    """Until ``ready()`` (a probe that is False while the process is not up yet); RuntimeError, with ``detail()``
    appended (where its log is, its last lines), if the process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up{detail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} within {timeout_s:.0f}s{detail()}")
        time.sleep(interval_s)  # polling a condition with a deadline
