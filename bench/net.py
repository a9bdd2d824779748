"""Local ports and HTTP readiness for the processes a benchmark (or a test) starts."""

from __future__ import annotations

import socket
import time
import urllib.request


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
