"""Where a stalled reader's memory goes: tracemalloc over the chaos suite's stalled-reader scenario.

The gateway runs in this process (memory store, ``tokenflow`` policy) in front of a simulated engine in its own
process; ``--streams`` chat streams with the default pacing and rate and ``max_tokens`` 2000 whose clients have
a 4 KB receive buffer and never read, after a warm-up batch of 50 of the same. Prints the Python heap that the
stalled streams added, per stream, by file and by line (tracemalloc's own bookkeeping inflates the RSS figure,
which is printed only as a sanity check; tests/chaos measures RSS without it).

    .venv/bin/python scripts/profile_stalled_memory.py --streams 200
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import linecache
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.net import free_port  # noqa: E402
from gateway.app import start_gateway  # noqa: E402
from gateway.config import load_config  # noqa: E402
from tests.support.stalled import stalled_readers  # noqa: E402


def rss() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def where(frame: tracemalloc.Frame) -> str:
    name = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    return f"{name}:{frame.lineno} {linecache.getline(frame.filename, frame.lineno).strip()[:80]}"


async def main(n: int, top: int) -> None:
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "backends.sim", "--profile", "sim-small", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine_url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(engine_url + "/health") as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                await asyncio.sleep(0.1)
            cfg = load_config(None, **{"server.port": 0, "engines": [{"name": "sim", "url": engine_url}],
                                       "server.log_level": "warning", "scheduler.policy": "tokenflow",
                                       "scheduler.tick_interval_s": 0.1})
            gw = await start_gateway(cfg, port=0)

            async def streams() -> list[dict[str, object]]:
                async with http.get(gw.url + "/v1/streams") as r:
                    data: list[dict[str, object]] = (await r.json())["data"]
                    return data

            async def all_stalled(k: int) -> None:
                while True:
                    d = await streams()
                    if len(d) == k and all(s["stalled"] for s in d):
                        return
                    await asyncio.sleep(0.2)

            warm = await asyncio.to_thread(stalled_readers, gw.url, 50)
            await all_stalled(50)
            for s in warm:
                s.close()
            await all_stalled(0)  # (none left)
            gc.collect()
            tracemalloc.start(1)
            rss0, snap0 = rss(), tracemalloc.take_snapshot()
            socks = await asyncio.to_thread(stalled_readers, gw.url, n)
            await all_stalled(n)
            gc.collect()
            snap1, rss1 = tracemalloc.take_snapshot(), rss()
            by_file = snap1.compare_to(snap0, "filename")
            print(f"{n} stalled streams: Python heap +{sum(s.size_diff for s in by_file) / n / 1024:.1f} KB each "
                  f"(RSS +{(rss1 - rss0) / n / 1024:.1f} KB each, tracemalloc's bookkeeping included)")
            print("by file:")
            for st in by_file[:top]:
                name = where(st.traceback[0]).split(":")[0]
                print(f"  {st.size_diff / n:7.0f} B {st.count_diff / n:6.1f} objects  {name}")
            print("by line:")
            for st in snap1.compare_to(snap0, "lineno")[:top]:
                print(f"  {st.size_diff / n:7.0f} B {st.count_diff / n:6.1f} objects  {where(st.traceback[0])}")
            tracemalloc.stop()
            for s in socks:
                s.close()
            await gw.close()
    finally:
        engine.terminate()
        engine.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args()
    uvloop.install()
    asyncio.run(main(a.streams, a.top))
