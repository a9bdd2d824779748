"""Fixtures for the page tests: a gateway serving the demo (``tokenflow serve --demo`` as a process) and a real
headless Chromium."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.http import spawn_gateway
from gateway.web import DEMO_ENGINES

from . import browser


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.1, engines=DEMO_ENGINES, args=("--demo",)) as url:
        yield url


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = browser.start()
    try:
        yield d
    finally:
        d.quit()


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; return it. Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(interval)
