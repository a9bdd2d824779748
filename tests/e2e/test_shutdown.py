"""A deploy's SIGTERM: the gateway stops within its configured bound even while long streams are open."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests.conftest import wait_for
from tests.support.procs import free_port


async def test_sigterm_with_open_streams_exits_within_the_shutdown_timeout():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENFLOW_SERVER__PORT": str(port), "TOKENFLOW_SERVER__LOG_LEVEL": "warning",
           "TOKENFLOW_SERVER__SHUTDOWN_TIMEOUT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, stdout=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                try:
                    async with http.get(url + "/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=60, interval=0.1)
            # Twenty answers that would take 400 s each at 5 tok/s.
            body = {"model": "sim-small", "prompt": "x", "stream": True, "max_tokens": 2000, "tokenflow": {"rate": 5}}
            responses = [await http.post(url + "/v1/completions", json=body) for _ in range(20)]
            for r in responses:
                assert r.status == 200
                await r.content.readline()
            proc.send_signal(signal.SIGTERM)
            # 1 s for the streams, 1 s for the handlers, start-up of the interpreter's exit: well under 30 s,
            # where aiohttp's default would wait up to 2 x 60 s.
            rc = await asyncio.to_thread(proc.wait, 30)
            assert rc == 0
            for r in responses:  # every client sees its stream end (cut, no [DONE]: it may resume elsewhere)
                rest = b""
                try:
                    rest = await asyncio.wait_for(r.content.read(), 10)
                except aiohttp.ClientPayloadError:
                    pass
                assert b"[DONE]" not in rest
                r.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
