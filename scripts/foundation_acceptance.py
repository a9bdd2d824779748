"""Measure the foundation's acceptance numbers against a real `tokenflow serve` process.

    .venv/bin/python scripts/foundation_acceptance.py

Starts the gateway with its embedded simulated engine on a free port, then reports: pacing accuracy at
20 tok/s through the official openai client, TTFT with no load, unpaced delivery speed, ten malformed
requests, and how fast a client disconnect frees the engine.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import aiohttp
import openai

from bench.net import free_port


async def token_times(client: openai.AsyncOpenAI, model: str, max_tokens: int, tokenflow: dict) -> list[float]:
    """Stream one chat answer; return when each content token arrived (monotonic clock)."""
    arr: list[float] = []
    s = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=max_tokens,
        extra_body={"tokenflow": tokenflow},
    )
    async for c in s:
        if c.choices and c.choices[0].delta.content:
            arr.append(time.monotonic())
    return arr


async def main() -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENFLOW_SERVER__PORT": str(port), "TOKENFLOW_SERVER__LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("gateway did not become ready")
                await asyncio.sleep(0.1)
            async with http.get(url + "/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

            # 1. Paced at 20 tok/s.
            ttfts, gaps = [], []
            for _ in range(5):
                t0 = time.monotonic()
                arr = await token_times(client, model, 60, {"rate": 20, "pacing": "smooth"})
                ttfts.append(arr[0] - t0)
                gaps += [b - a for a, b in zip(arr, arr[1:])]
            gaps_ms = sorted(g * 1000 for g in gaps)
            within = sum(1 for g in gaps_ms if 40 <= g <= 60) / len(gaps_ms)
            print(f"paced 20 tok/s: {len(gaps_ms)} gaps, median {statistics.median(gaps_ms):.2f} ms, "
                  f"p1 {gaps_ms[len(gaps_ms) // 100]:.2f} ms, p99 {gaps_ms[len(gaps_ms) * 99 // 100]:.2f} ms, "
                  f"within 40-60 ms: {within:.1%}")
            print(f"TTFT no load (5 requests): median {statistics.median(ttfts) * 1000:.1f} ms, "
                  f"max {max(ttfts) * 1000:.1f} ms")

            # 2. Unpaced.
            arr = await token_times(client, model, 200, {"rate": 5, "pacing": "none"})
            rate = (len(arr) - 1) / (arr[-1] - arr[0])
            print(f"pacing none (declared 5 tok/s): {len(arr)} tokens at {rate:.0f} tok/s (engine speed)")

            # 3. Ten malformed requests, then a good one.
            bad = [
                b"{oops", b"[]", b'{"model": "x", "messages": [{"role": "user", "content": "a"}]}',
                b'{"model": "%s", "messages": "a"}',
                b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "tokenflow": {"rate": -1}}',
                b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "tokenflow": {"rate": 1e9}}',
                b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}',
                b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "max_tokens": "ten"}',
                b'{"model": "%s", "messages": [{"role": "bot", "content": "a"}]}',
                b'{"model": 7, "messages": [{"role": "user", "content": "a"}]}',
            ]
            statuses = []
            for b in bad:
                b = b.replace(b"%s", model.encode())
                async with http.post(url + "/v1/chat/completions", data=b,
                                     headers={"Content-Type": "application/json"}) as r:
                    j = await r.json()
                    statuses.append((r.status, j["error"]["type"]))
            ok = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=5)
            print(f"malformed: statuses {[s for s, _ in statuses]}; "
                  f"next good request -> {ok.usage.completion_tokens} tokens")

            # 4. Disconnect frees the engine.
            times = []
            for _ in range(5):
                resp = await http.post(url + "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "max_tokens": 3000})
                sid = resp.headers["X-TokenFlow-Stream-Id"]
                await resp.content.readline()
                async with http.get(f"{url}/v1/streams/{sid}") as r:
                    assert r.status == 200
                resp.close()
                t0 = time.monotonic()
                # The gateway's own view disappears first; the engine is asked over the control API below.
                while True:
                    async with http.get(f"{url}/v1/streams/{sid}") as r:
                        if r.status == 404:
                            break
                    await asyncio.sleep(0.002)
                times.append(time.monotonic() - t0)
            print(f"disconnect -> stream gone from the gateway: median {statistics.median(times) * 1000:.1f} ms, "
                  f"max {max(times) * 1000:.1f} ms "
                  "(engine-side check: tests/e2e/test_gateway_api.py::test_client_disconnect_frees_the_engine)")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
