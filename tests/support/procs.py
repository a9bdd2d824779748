"""Processes for tests: free ports, subprocesses with their output in a log file, waiting until they answer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.net import free_port

__all__ = ["ROOT", "Proc", "free_port", "poll"]

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A subprocess in a session of its own, its stdout and stderr in ``<logdir>/<name>.log``."""

    def __init__(self, name: str, argv: list[str], logdir: Path, *, env: dict[str, str] | None = None,
                 cwd: Path = ROOT, url: str = "") -> None:
        self.name = name
        self.url = url
        self.log = logdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=os.environ.copy() if env is None else env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send ``sig`` (to the process, not its group) and wait ``timeout`` s for it to exit, then kill it."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig, 10.0)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_http(self, path: str, timeout: float = 60.0) -> None:
        """Until ``url + path`` answers 200; AssertionError with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not answering {path} within {timeout} s ({last}):\n{self.tail()}")


async def poll(pred: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05) -> float:
    """Await ``pred()`` until true (connection errors count as false); the seconds it took. Raises AssertionError
    after ``timeout``."""
    t0 = time.monotonic()
    while True:
        try:
            if await pred():
                return time.monotonic() - t0
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)
