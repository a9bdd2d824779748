"""Redis round trips per delivered token, with the Redis session store.

Runs a gateway (in this process, embedded simulated engine, Redis store on a private key prefix), streams
``--streams`` concurrent requests through it and counts every request the Redis client writes to the socket
(a wrapper on redis-py's connection: one pipeline = one round trip, connection set-up included) against the
tokens the clients received. Also reports Redis-side command counts (INFO commandstats) per token.

    .venv/bin/python scripts/bench_redis_roundtrips.py --streams 50 --max-tokens 200 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aiohttp
import orjson
import redis
from redis.asyncio.connection import AbstractConnection

from gateway.app import start_gateway
from gateway.config import load_config

SENDS = 0
_orig_send = AbstractConnection.send_packed_command


async def _counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
    global SENDS
    SENDS += 1
    return await _orig_send(self, command, check_health)


AbstractConnection.send_packed_command = _counting_send  # type: ignore[method-assign]


def _commands(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


TTFT: list[float] = []


async def _client(http: aiohttp.ClientSession, url: str, body: dict) -> int:
    n = 0
    t0 = time.monotonic()
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                obj = orjson.loads(line[5:].strip())
                k = sum(c.get("text", "").count(" tok") for c in obj.get("choices") or ())
                if k and not n:
                    TTFT.append(time.monotonic() - t0)
                n += k
    return n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="client reading rate (tokens/s, paced)")
    ap.add_argument("--flush-interval", type=float, default=None, help="session.flush_interval_s")
    ap.add_argument("--store", choices=("redis", "memory"), default="redis", help="memory: the baseline, no Redis")
    args = ap.parse_args()
    prefix = "bench" + uuid.uuid4().hex[:8]
    overrides = {"server.port": 0, "session.store": args.store, "session.redis_url": args.redis_url,
                 "session.key_prefix": prefix, "server.log_level": "warning"}
    if args.flush_interval is not None:
        overrides["session.flush_interval_s"] = args.flush_interval
    cfg = load_config(None, **overrides)
    sync = redis.Redis.from_url(args.redis_url)
    gw = await start_gateway(cfg, port=0)
    try:
        model = sorted(gw.gateway.models)[0]
        async with aiohttp.ClientSession() as http:  # warm up: connections, scripts
            await _client(http, gw.url, {"model": model, "prompt": "warm", "stream": True, "max_tokens": 5,
                                         "tokenflow": {"pacing": "none"}})
            await asyncio.sleep(0.5)
            TTFT.clear()
            sends0, cmds0, t0 = SENDS, _commands(sync), time.monotonic()
            rt0 = getattr(gw.gateway.store, "roundtrips", 0)
            bodies = [{"model": model, "prompt": f"prompt {i}", "stream": True, "max_tokens": args.max_tokens,
                       "tokenflow": {"rate": args.rate}} for i in range(args.streams)]
            tokens = sum(await asyncio.gather(*(_client(http, gw.url, b) for b in bodies)))
            elapsed = time.monotonic() - t0
            sends, cmds = SENDS - sends0, _commands(sync) - cmds0 - 1
            rt = getattr(gw.gateway.store, "roundtrips", 0) - rt0
    finally:
        await gw.close()
        keys = list(sync.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            sync.delete(*keys)
    print(f"{args.streams} streams x {args.max_tokens} tokens at {args.rate:g} tok/s: {tokens} tokens delivered in "
          f"{elapsed:.1f} s (flush interval {cfg.session.flush_interval_s * 1000:.0f} ms, tick "
          f"{cfg.session.tick_interval_s * 1000:.0f} ms)")
    ttft = sorted(TTFT)
    print(f"store {args.store}: time to first token median {ttft[len(ttft) // 2] * 1000:.1f} ms, "
          f"p90 {ttft[int(len(ttft) * 0.9)] * 1000:.1f} ms (client side)")
    print(f"Redis round trips: {sends} ({rt} counted by the store) = {sends / max(tokens, 1):.4f} per delivered token")
    print(f"Redis commands executed (INFO commandstats, every client): {cmds} = {cmds / max(tokens, 1):.4f} per token")


if __name__ == "__main__":
    asyncio.run(main())
