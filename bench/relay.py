"""``tokenflow bench relay``: what relaying a token costs, side by side with nginx, in one run.

For each concurrency level and each target (``direct`` to the engine, ``nginx`` as a plain SSE reverse proxy
with ``proxy_buffering off``, the gateway with pacing ``none`` and with ``smooth`` pacing) it starts a fresh
proxy pinned to core 0 (to cores 0..N-1 with ``--workers N``), a fast fake engine (bench/fast_upstream.py:
pre-encoded chunks on one timer; ``--upstreams K`` runs K such processes on one port with SO_REUSEPORT, so the
engine is not the limit) and closed-loop load generators pinned to the other cores, and measures over a
steady window:

* the proxy's CPU seconds per delivered token (user + system of all its processes, from /proc/<pid>/stat);
* delivered versus offered tokens/s (offered: streams x their rate);
* TTFT p50 / p99 and the TTFT added over ``direct`` at the same concurrency;
* pacing lateness p50 / p99 (smooth pacing only): how late paced tokens leave compared with their due time,
  from the gateway's ``tokenflow_pacing_lateness_seconds`` histogram (window delta of /metrics);
* the rig's own CPU (engine + load generators) and the machine's load average, to show the rig was not
  the limit and how busy the machine was; with the Redis store on this machine, Redis' CPU too.

Scaling over workers: ``--workers 1,2,4 --streams-per-worker --streams 2000`` runs 2,000 streams per worker
(2,000, 4,000, 8,000), and the report's scaling table divides each worker count's delivered tokens/s by one
worker's at the same load per worker.

Each client stream asks for ``--tokens`` tokens; a finished stream is replaced at once on the same
keep-alive connection. ``--memory N`` instead measures the gateway's resident memory per idle paced stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.net import free_port, wait_http

TARGETS = ("direct", "nginx", "gateway-none", "gateway-smooth")
_TICK_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_TOKEN_MARK = b'"finish_reason":null'  # one per token chunk (the closing chunk names its reason)
_PY = sys.executable
_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- load generator (its own process)


class _Client(asyncio.Protocol):
    """One client connection: a streaming request, count its token chunks, then the next request."""

    def __init__(self, lg: _LoadGen) -> None:
        self.lg = lg
        self.tr: asyncio.Transport | None = None
        self.state = 0  # 0 head, 1 body, 2 after [DONE]
        self.buf = b""
        self.tail = b""
        self.sent = 0.0
        self.first = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.state, self.buf, self.tail, self.first = 0, b"", b"", True
        self.sent = time.time()
        self.lg.started += 1
        self.tr.write(self.lg.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != 3:
            self.lg.errors += 1 if self.lg.running else 0
        self.lg.conns.discard(self)
        if self.lg.running:
            self.lg.connect_later()

    def data_received(self, data: bytes) -> None:
        lg = self.lg
        if self.state == 0:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 200"):
                lg.errors += 1
                lg.last_error = self.buf[:200].decode("latin-1")
                self.state = 3
                self.tr.close()  # type: ignore[union-attr]
                return
            data, self.buf, self.state = self.buf[i + 4:], b"", 1
        s = self.tail + data
        if self.state == 1:
            n = s.count(_TOKEN_MARK)
            if n:
                lg.tokens += n
                if self.first:
                    self.first = False
                    now = time.time()
                    if lg.w0 <= now < lg.w1:
                        lg.ttft.append(now - self.sent)
            if b"[DONE]" in s:
                self.state = 2
        if self.state == 2 and s.endswith(b"0\r\n\r\n"):
            lg.finished += 1
            if lg.running:
                self.send()
            else:
                self.state = 3
                self.tr.close()  # type: ignore[union-attr]
            return
        self.tail = s[-(len(_TOKEN_MARK) - 1):]


class _LoadGen:
    def __init__(self, host: str, port: int, path: str, body: bytes, w0: float, w1: float) -> None:
        self.host, self.port = host, port
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.w0, self.w1 = w0, w1
        self.tokens = self.started = self.finished = self.errors = 0
        self.ttft: list[float] = []
        self.conns: set[_Client] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # the connecting clients (referenced until they finish)
        self.running = True
        self.last_error = ""
        self.marks: dict[str, int] = {}

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(lambda: _Client(self), self.host, self.port)
            self.conns.add(proto)
        except OSError as e:
            self.errors += 1
            self.last_error = str(e)
            if self.running:
                self.connect_later()

    def _mark(self, window_edge: str) -> None:
        self.marks[window_edge] = self.tokens

    def connect_later(self) -> None:
        asyncio.get_running_loop().call_later(0.2, self._reconnect)

    def _reconnect(self) -> None:
        task = asyncio.ensure_future(self.connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, streams: int, start: float, ramp_s: float, stop: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for k, t in (("w0", self.w0), ("w1", self.w1)):
            loop.call_later(max(0.0, t - time.time()), self._mark, k)
        await asyncio.sleep(max(0.0, start - time.time()))
        for _ in range(streams):
            task = asyncio.ensure_future(self.connect())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(ramp_s / max(1, streams))
        await asyncio.sleep(max(0.0, stop - time.time()))
        self.running = False
        for c in list(self.conns):
            if c.tr is not None:
                c.state = 3
                c.tr.close()
        return {"tokens": self.marks.get("w1", self.tokens) - self.marks.get("w0", 0), "ttft": self.ttft,
                "started": self.started, "finished": self.finished, "errors": self.errors,
                "last_error": self.last_error}


def _loadgen_main(spec: str) -> int:
    a = json.loads(spec)
    _raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    lg = _LoadGen(a["host"], a["port"], a["path"], a["body"].encode(), a["w0"], a["w1"])
    out = asyncio.run(lg.run(a["streams"], a["start"], a["ramp_s"], a["stop"]))
    sys.stdout.write(json.dumps(out))
    return 0


# ---------------------------------------------------------------- process accounting


def _raise_nofile() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover
        pass


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[11]) / _TICK_HZ, int(fields[12]) / _TICK_HZ


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu(root: int) -> tuple[float, float]:
    u = s = 0.0
    for p in tree_pids(root):
        try:
            pu, ps = proc_cpu(p)
        except (OSError, ValueError, IndexError):
            continue
        u, s = u + pu, s + ps
    return u, s


def tree_io(root: int) -> tuple[int, int]:
    """read()-family and write()-family system calls of ``root`` and its descendants (/proc/<pid>/io: syscr,
    syscw). uvloop reads and writes sockets with read/write(v), so for the gateway these count its socket reads
    and writes; nginx receives with recv(), which these counters do not see."""
    r = w = 0
    for p in tree_pids(root):
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("syscr:"):
                    r += int(line.split()[1])
                elif line.startswith("syscw:"):
                    w += int(line.split()[1])
        except OSError:
            continue
    return r, w


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants."""
    total = 0
    for p in tree_pids(root):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def percentile(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def hist_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative (upper bound, count) buckets, linear within a bucket (Prometheus' way)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            span = c - prev_c
            return prev_le + (le - prev_le) * ((rank - prev_c) / span if span > 0 else 0.0)
        prev_le, prev_c = le, c
    return prev_le


def scrape_hist(url: str, name: str) -> list[tuple[float, float]]:
    """Cumulative buckets of histogram ``name`` summed over its label sets ([] if an overloaded proxy does not
    answer in time: the case then reports no lateness rather than failing the run)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return []
    acc: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix):].rsplit("} ", 1)
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            b = float("inf") if le == "+Inf" else float(le)
            acc[b] = acc.get(b, 0.0) + float(value)
    return sorted(acc.items())


def hist_delta(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    before = dict(a)
    return [(le, c - before.get(le, 0.0)) for le, c in b]


# ---------------------------------------------------------------- the proxies


def split_cores(avail: Sequence[int], workers: int = 1) -> tuple[list[int], list[int]]:
    """(proxy cores, rig cores) out of ``avail``: the first ``workers`` cores for the proxy, the rest for the
    engine and load generators. With fewer cores than workers + 1 the proxy gets up to ``workers`` cores and
    the rig shares them all (such a run cannot show scaling); with fewer than 2 cores nothing is pinned."""
    avail = sorted(avail)
    if len(avail) < 2:
        return [], []
    n = max(1, workers)
    if n < len(avail):
        return avail[:n], avail[n:]
    return avail[:n], avail


def cores(workers: int = 1) -> tuple[list[int], list[int]]:
    """:func:`split_cores` of the cores this process may run on."""
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return split_cores(avail, workers)


_NICE = 0  # --nice: priority of every process of the run (on a shared machine, ahead of other work)


def _pinned(cmd: list[str], cpus: list[int]) -> list[str]:
    if _NICE and shutil.which("nice"):
        cmd = ["nice", "-n", str(_NICE), *cmd]
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    return cmd


def find_nginx() -> str | None:
    exe = shutil.which("nginx")
    if exe is None and os.access("/usr/sbin/nginx", os.X_OK):
        exe = "/usr/sbin/nginx"
    return exe


def nginx_conf(workdir: Path, port: int, upstream: int, workers: int) -> str:
    temps = "\n".join(f"  {k}_temp_path {workdir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""worker_processes {workers};
worker_rlimit_nofile 65536;
error_log {workdir / 'error.log'} warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
{temps}
  upstream engine {{ server 127.0.0.1:{upstream}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_cache off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def upstream_cmd(port: int, rate: float, shared: bool) -> list[str]:
    """The fast engine's command line (``shared``: one of several processes on the port)."""
    cmd = [_PY, "-m", "bench.fast_upstream", "--port", str(port), "--rate", str(rate)]
    return cmd + ["--reuse-port"] if shared else cmd


def start_upstream(rate: float, cpus: list[int], log: Path) -> Proc:
    return start_upstreams(rate, 1, cpus, log)[0]


def start_upstreams(rate: float, k: int, cpus: list[int], log: Path, deadline_s: float = 30.0) -> list[Proc]:
    """``k`` fast engine processes on one port (SO_REUSEPORT when k > 1), each logging to ``log`` (k = 1) or
    ``log`` with ``-i`` before its suffix; each is waited for by its own "fast upstream on" line, since a
    request to the shared port may reach any of them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    logs: list[Path] = []
    try:
        for i in range(max(1, k)):
            lg = log if k <= 1 else log.with_name(f"{log.stem}-{i}{log.suffix}")
            lg.unlink(missing_ok=True)
            logs.append(lg)
            p = subprocess.Popen(_pinned(upstream_cmd(port, rate, k > 1), cpus), cwd=_ROOT, stdout=lg.open("ab"),
                                 stderr=subprocess.STDOUT)
            procs.append(Proc("upstream", p, url))
        end = time.time() + deadline_s
        for pr, lg in zip(procs, logs):
            while b"fast upstream on" not in (lg.read_bytes() if lg.exists() else b""):
                if pr.popen.poll() is not None or time.time() > end:
                    raise RuntimeError(f"fast upstream did not come up: {lg.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
        wait_http(url + "/v1/models")
    except BaseException:
        for pr in procs:
            pr.stop()
        raise
    return procs


def start_nginx(upstream_port: int, cpus: list[int], workdir: Path, workers: int = 1) -> Proc:
    exe = find_nginx()
    if exe is None:
        raise RuntimeError("nginx is not installed (scripts/install-test-deps.sh installs nginx-light)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, port, upstream_port, workers))
    directives = f"daemon off; pid {workdir / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
    p = subprocess.Popen(_pinned([exe, "-p", str(workdir), "-c", str(conf), "-g", directives], cpus),
                         stdout=(workdir / "out.log").open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models")
    return Proc("nginx", p, url)


def gateway_config(upstream_url: str, port: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "max_streams": 100000, "log_level": "warning"},
        "engines": [{"name": "fast", "url": upstream_url, "models": ["fast"]}],
        # The fake engine acts on no command: fcfs keeps the control loop (state, snapshot, buffer metrics each
        # tick) without decisions, so the run measures the relay and pacing, not a policy.
        "scheduler": {"policy": "fcfs"},
    }
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def start_gateway(upstream_url: str, cpus: list[int], workdir: Path, workers: int = 1,
                  extra: dict[str, Any] | None = None) -> Proc:
    import yaml

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "gateway.yaml"
    conf.write_text(yaml.safe_dump(gateway_config(upstream_url, port, extra)))
    cmd = [_PY, "-m", "gateway.cli", "serve", "--config", str(conf)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLOW_")}
    p = subprocess.Popen(_pinned(cmd, cpus), cwd=_ROOT, env=env, stdout=(workdir / "gateway.log").open("ab"),
                         stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", 60)
    return Proc("gateway", p, url)


# ---------------------------------------------------------------- one case


@dataclass
class CaseResult:
    target: str
    streams: int
    workers: int
    window_s: float
    offered_tps: float
    delivered_tps: float
    cpu_s: float
    cpu_user_s: float
    cpu_sys_s: float
    cpu_us_per_token: float | None
    proxy_cpu_share: float  # of one core
    rig_cpu_share: float  # engine + load generators, in cores
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    lateness_p50_ms: float | None = None
    lateness_p99_ms: float | None = None
    errors: int = 0
    completed_streams: int = 0
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    added_ttft_p50_ms: float | None = None
    added_ttft_p99_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    store: str = "-"
    proxy_cores_pinned: int = 0  # cores the proxy was pinned to (0: not pinned)
    proxy_process_cores: list[float] = field(default_factory=list)  # CPU share of each proxy process, largest first
    upstreams: int = 1  # fast engine processes
    redis_cpu_share: float | None = None  # Redis' CPU (cores) when it runs on this machine and the store is redis
    reads_per_token: float | None = None  # the gateway's read() calls per delivered token (engine and client sockets)
    writes_per_token: float | None = None  # the gateway's write() calls per delivered token


@dataclass
class Options:
    tokens: int = 200
    upstream_rate: float = 50.0
    pace_rate: float = 20.0
    warmup_s: float = 5.0
    window_s: float = 10.0
    ramp_s: float = 2.0
    loadgens: int = 2
    workers: int = 1
    pin: bool = True
    profile_dir: str | None = None  # py-spy profiles of the gateway over each window land here
    store: str = "memory"  # the gateway's session store (redis whenever workers > 1)
    redis_url: str = "redis://127.0.0.1:6379/0"
    upstreams: int = 1  # fast engine processes sharing the engine port


_REDIS_PID: dict[str, int | None] = {}


def local_redis_pid(url: str) -> int | None:
    """The pid of the Redis server at ``url`` when it runs on this machine (INFO's process_id, checked against
    /proc: its command line names redis), else None; asked once per URL."""
    if url in _REDIS_PID:
        return _REDIS_PID[url]
    pid: int | None = None
    try:
        import redis

        r = redis.Redis.from_url(url, socket_timeout=5)
        try:
            pid = int(r.info("server")["process_id"])
        finally:
            r.close()
        if b"redis" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            pid = None
    except Exception:  # noqa: BLE001 - no Redis, another host or another pid namespace: no Redis CPU reported
        pid = None
    _REDIS_PID[url] = pid
    return pid


def tree_cpu_by_pid(root: int) -> dict[int, float]:
    """user + system CPU seconds of ``root`` and each descendant, by pid."""
    out: dict[int, float] = {}
    for p in tree_pids(root):
        try:
            out[p] = sum(proc_cpu(p))
        except (OSError, ValueError, IndexError):
            continue
    return out


def run_case(target: str, streams: int, o: Options, workdir: Path) -> CaseResult:
    # N workers: N cores for the proxy, the rest for the rig (all of them shared if there are too few)
    proxy_cpus, rig_cpus = cores(o.workers) if o.pin else ([], [])
    workdir.mkdir(parents=True, exist_ok=True)
    ups = start_upstreams(o.upstream_rate, o.upstreams, rig_cpus, workdir / "upstream.log")
    up = ups[0]
    procs: list[Proc] = list(ups)
    proxy: Proc | None = None
    try:
        if target == "direct":
            url = up.url
        elif target == "nginx":
            proxy = start_nginx(int(up.url.rsplit(":", 1)[1]), proxy_cpus, workdir / "nginx", o.workers)
            url = proxy.url
        else:
            extra = None
            if o.store == "redis" or o.workers > 1:  # workers share state through Redis (docs/replicas.md)
                extra = {"session": {"store": "redis", "redis_url": o.redis_url,
                                     "key_prefix": f"bench-relay-{os.getpid()}-{streams}-{int(time.time())}"}}
            proxy = start_gateway(up.url, proxy_cpus, workdir / "gateway", o.workers, extra)
            url = proxy.url
        if proxy is not None:
            procs.append(proxy)
        smooth = target == "gateway-smooth"
        body: dict[str, Any] = {"model": "fast", "prompt": "hello", "max_tokens": o.tokens, "stream": True}
        if target.startswith("gateway"):
            body["tokenflow"] = {"pacing": "smooth", "rate": o.pace_rate} if smooth else {"pacing": "none"}
        host, port = url.split("//", 1)[1].split(":")
        t0 = time.time() + 0.5
        w0 = t0 + o.ramp_s + o.warmup_s
        w1 = w0 + o.window_s
        stop = w1 + 0.2
        n_gen = max(1, min(o.loadgens, streams))
        gens = []
        for i in range(n_gen):
            share = streams // n_gen + (1 if i < streams % n_gen else 0)
            spec = json.dumps({"host": host, "port": int(port), "path": "/v1/completions",
                               "body": json.dumps(body), "streams": share, "start": t0, "ramp_s": o.ramp_s,
                               "w0": w0, "w1": w1, "stop": stop})
            gens.append(subprocess.Popen(_pinned([_PY, "-m", "bench.relay", "_loadgen", spec], rig_cpus), cwd=_ROOT,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        rig_roots = [u.popen.pid for u in ups] + [g.pid for g in gens]
        redis_pid = local_redis_pid(o.redis_url) if target.startswith("gateway") and (
            o.store == "redis" or o.workers > 1) else None
        time.sleep(max(0.0, w0 - time.time()))
        c0 = tree_cpu(proxy.popen.pid) if proxy else (0.0, 0.0)
        p0 = tree_cpu_by_pid(proxy.popen.pid) if proxy else {}
        r0 = sum(sum(tree_cpu(p)) for p in rig_roots)
        d0 = sum(tree_cpu(redis_pid)) if redis_pid else 0.0
        io0 = tree_io(proxy.popen.pid) if proxy else (0, 0)
        m0 = time.time()
        # Lateness from /metrics: one process answers a scrape, so only with one worker.
        late = smooth and o.workers == 1
        h0 = scrape_hist(url, "tokenflow_pacing_lateness_seconds") if late else []
        spy = _profile(proxy, target, streams, o) if proxy is not None and target.startswith("gateway") else None
        time.sleep(max(0.0, w1 - time.time()))
        c1 = tree_cpu(proxy.popen.pid) if proxy else (0.0, 0.0)
        p1 = tree_cpu_by_pid(proxy.popen.pid) if proxy else {}
        r1 = sum(sum(tree_cpu(p)) for p in rig_roots)
        d1 = sum(tree_cpu(redis_pid)) if redis_pid else 0.0
        io1 = tree_io(proxy.popen.pid) if proxy else (0, 0)
        window = time.time() - m0  # the span of the CPU readings (the lateness scrapes may lag under overload)
        h1 = scrape_hist(url, "tokenflow_pacing_lateness_seconds") if late else []
        load = os.getloadavg()
        if spy is not None:
            spy.wait(30)
        outs = []
        for g in gens:
            out, err = g.communicate(timeout=60)
            if g.returncode != 0:
                raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
            outs.append(json.loads(out))
    finally:
        for p in reversed(procs):
            p.stop()
    tokens = sum(x["tokens"] for x in outs)
    ttft = [t for x in outs for t in x["ttft"]]
    cu, cs = c1[0] - c0[0], c1[1] - c0[1]
    cpu = cu + cs
    rate = o.pace_rate if smooth else o.upstream_rate
    res = CaseResult(
        target=target, streams=streams, workers=o.workers, window_s=round(window, 3),
        offered_tps=streams * rate, delivered_tps=tokens / o.window_s, cpu_s=round(cpu, 3), cpu_user_s=round(cu, 3),
        cpu_sys_s=round(cs, 3), cpu_us_per_token=(cpu / tokens * 1e6) if proxy and tokens else None,
        proxy_cpu_share=round(cpu / window, 3), rig_cpu_share=round((r1 - r0) / window, 3),
        ttft_p50_ms=_ms(percentile(ttft, 50)), ttft_p99_ms=_ms(percentile(ttft, 99)),
        errors=sum(x["errors"] for x in outs), completed_streams=sum(x["finished"] for x in outs),
        loadavg=load,
        proxy_cores_pinned=len(proxy_cpus) if proxy else 0, upstreams=len(ups),
        proxy_process_cores=sorted((round((p1[k] - p0[k]) / window, 3) for k in p1 if k in p0
                                    and p1[k] - p0[k] > 0.01 * window), reverse=True),
        redis_cpu_share=round((d1 - d0) / window, 3) if redis_pid else None,
    )
    if target.startswith("gateway"):
        res.store = "redis" if (o.store == "redis" or o.workers > 1) else "memory"
        if tokens:
            res.reads_per_token = round((io1[0] - io0[0]) / tokens, 3)
            res.writes_per_token = round((io1[1] - io0[1]) / tokens, 3)
    if late and h0 and h1:
        d = hist_delta(h0, h1)
        res.lateness_p50_ms = _ms(hist_quantile(d, 0.50))
        res.lateness_p99_ms = _ms(hist_quantile(d, 0.99))
    errs = [x["last_error"] for x in outs if x["last_error"]]
    if errs:
        res.notes.append(errs[0][:200])
    return res


def _profile(proxy: Proc, target: str, streams: int, o: Options) -> subprocess.Popen[bytes] | None:
    """py-spy over the measured window (sampling at 100 Hz costs the proxy little), raw collapsed stacks."""
    if not o.profile_dir:
        return None
    spy = shutil.which("py-spy") or str(Path(_PY).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        print("  (py-spy not found: pip install py-spy; no profile)", file=sys.stderr)
        return None
    Path(o.profile_dir).mkdir(parents=True, exist_ok=True)
    dest = Path(o.profile_dir) / f"{target}-{streams}-x{o.workers}.txt"
    cmd = [spy, "record", "-p", str(proxy.popen.pid), "-d", str(max(1, int(o.window_s) - 1)), "-r", "100", "-f", "raw",
           "-o", str(dest), "--nonblocking", "--subprocesses"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


# ---------------------------------------------------------------- memory per idle paced stream


async def _hold_streams(url: str, n: int, body: bytes, settle_s: float, measure: Any) -> int:
    host, port = url.split("//", 1)[1].split(":")
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(n):
        r, w = await asyncio.open_connection(host, int(port))
        w.write(req)
        conns.append((r, w))
    ok = 0
    for r, _ in conns:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60)
        ok += head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(settle_s)
    measure()
    for _, w in conns:
        w.close()
    return ok


def memory_case(n: int, o: Options, workdir: Path) -> dict[str, Any]:
    """RSS of the gateway before and with ``n`` open paced streams that trickle (1 token/s, paced at 1/s),
    and the CPU the gateway spends per second holding them (the load generator sleeps meanwhile)."""
    _raise_nofile()
    proxy_cpus, rig_cpus = cores() if o.pin else ([], [])
    up = start_upstream(1.0, rig_cpus, workdir / "upstream.log")
    gw = start_gateway(up.url, proxy_cpus, workdir / "gateway")
    try:
        body = json.dumps({"model": "fast", "prompt": "hello", "max_tokens": 100000, "stream": True,
                           "tokenflow": {"pacing": "smooth", "rate": 1.0}}).encode()
        # Warm the gateway (imports, first-request paths, allocator arenas) with a small batch first.
        asyncio.run(_hold_streams(gw.url, min(50, n), body, 1.0, lambda: None))
        time.sleep(1.0)
        before = tree_rss(gw.popen.pid)
        seen: dict[str, Any] = {}

        def measure() -> None:  # resident memory, then CPU over a few seconds of holding the streams open
            seen["rss"] = tree_rss(gw.popen.pid)
            c0, t0 = sum(tree_cpu(gw.popen.pid)), time.time()
            time.sleep(5.0)
            seen["cpu_per_s"] = (sum(tree_cpu(gw.popen.pid)) - c0) / (time.time() - t0)

        ok = asyncio.run(_hold_streams(gw.url, n, body, 3.0, measure))
    finally:
        gw.stop()
        up.stop()
    delta = seen["rss"] - before
    return {"streams": n, "opened": ok, "rss_before_bytes": before, "rss_with_streams_bytes": seen["rss"],
            "bytes_per_stream": round(delta / max(1, n)), "cpu_cores_while_held": round(seen["cpu_per_s"], 4),
            "cpu_us_per_stream_second": round(seen["cpu_per_s"] / max(1, n) * 1e6, 2)}


# ---------------------------------------------------------------- report


def table(results: list[CaseResult]) -> str:
    nginx = {r.streams: r.cpu_us_per_token for r in results if r.target == "nginx"}
    head = ("| target | streams | CPU µs/token (user+sys) | x nginx | proxy cores | delivered / offered tok/s | "
            "TTFT p50 / p99 ms | added TTFT p50 / p99 ms | lateness p50 / p99 ms | rig cores | errors | "
            "reads / writes per token |")
    lines = [head, "|" + "---|" * 12]
    wide = any(r.proxy_cores_pinned > 1 or r.upstreams > 1 or r.redis_cpu_share is not None for r in results)
    if wide:  # scaling runs: the cores the proxy was pinned to, engine processes and Redis' CPU as well
        lines = [head + " proxy cores pinned | engines | redis cores |", "|" + "---|" * 15]
    for r in results:
        cpu = "-" if r.cpu_us_per_token is None else (
            f"{r.cpu_us_per_token:.1f} ({r.cpu_user_s / max(r.cpu_s, 1e-9) * r.cpu_us_per_token:.1f}+"
            f"{r.cpu_sys_s / max(r.cpu_s, 1e-9) * r.cpu_us_per_token:.1f})")
        ref = nginx.get(r.streams)
        ratio = f"{r.cpu_us_per_token / ref:.2f}" if r.cpu_us_per_token and ref else "-"
        target = f"{r.target}{'' if r.workers == 1 else f' x{r.workers}'}{' (redis)' if r.store == 'redis' else ''}"
        lines.append(
            f"| {target} | {r.streams} | {cpu} | {ratio} | "
            f"{r.proxy_cpu_share:.2f} | {r.delivered_tps:,.0f} / {r.offered_tps:,.0f} | "
            f"{_f(r.ttft_p50_ms)} / {_f(r.ttft_p99_ms)} | "
            f"{_f(r.added_ttft_p50_ms, True)} / {_f(r.added_ttft_p99_ms, True)} | "
            f"{_f(r.lateness_p50_ms)} / {_f(r.lateness_p99_ms)} | {r.rig_cpu_share:.2f} | {r.errors} | "
            f"{_f(r.reads_per_token)} / {_f(r.writes_per_token)} |"
            + (f" {r.proxy_cores_pinned or '-'} | {r.upstreams} | {_f(r.redis_cpu_share)} |" if wide else ""))
    return "\n".join(lines)


def scaling(results: list[CaseResult], per_worker: bool) -> list[dict[str, Any]]:
    """Delivered tokens/s of each worker count over one worker's, per target and load: the load is the
    streams per worker with ``per_worker`` (--streams-per-worker), else the total streams. ``efficiency`` is
    that ratio over the worker count (1.0: linear)."""
    base: dict[tuple[str, int], CaseResult] = {}
    key = {id(r): (r.target, r.streams // max(1, r.workers) if per_worker else r.streams) for r in results}
    for r in results:
        if r.workers == 1:
            base[key[id(r)]] = r
    out = []
    for r in results:
        b = base.get(key[id(r)])
        if b is None or not b.delivered_tps:
            continue
        x = r.delivered_tps / b.delivered_tps
        out.append({"target": r.target, "load": key[id(r)][1], "workers": r.workers, "streams": r.streams,
                    "delivered_tps": round(r.delivered_tps), "proxy_cores": r.proxy_cpu_share,
                    "vs_one_worker": round(x, 3), "efficiency": round(x / max(1, r.workers), 3)})
    return out


def scaling_table(rows: list[dict[str, Any]], per_worker: bool) -> str:
    load = "streams per worker" if per_worker else "streams"
    lines = [f"| target | {load} | workers | total streams | delivered tok/s | proxy cores | x 1 worker "
             "| x / workers |",
             "|" + "---|" * 8]
    for x in rows:
        lines.append(f"| {x['target']} | {x['load']} | {x['workers']} | {x['streams']} | {x['delivered_tps']:,} | "
                     f"{x['proxy_cores']:.2f} | {x['vs_one_worker']:.2f} | {x['efficiency']:.2f} |")
    return "\n".join(lines)


def case_streams(levels: Sequence[int], workers: int, per_worker: bool) -> list[int]:
    """The stream counts run with ``workers`` workers: the levels as given, or times the workers."""
    return [n * workers if per_worker else n for n in levels]


def _f(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if sign else f"{v:.2f}"


def _median_case(runs: list[CaseResult]) -> CaseResult:
    """Median over repeats, field by field, of the numbers; the rest from the first run."""
    if len(runs) == 1:
        return runs[0]
    out = CaseResult(**asdict(runs[0]))
    for f in ("delivered_tps", "cpu_s", "cpu_user_s", "cpu_sys_s", "cpu_us_per_token", "proxy_cpu_share",
              "rig_cpu_share", "ttft_p50_ms", "ttft_p99_ms", "lateness_p50_ms", "lateness_p99_ms", "redis_cpu_share",
              "reads_per_token", "writes_per_token"):
        vals = [getattr(r, f) for r in runs if getattr(r, f) is not None]
        setattr(out, f, statistics.median(vals) if vals else None)
    out.errors = sum(r.errors for r in runs)
    out.notes = [f"median of {len(runs)} runs; CPU µs/token per run: "
                 + ", ".join("-" if r.cpu_us_per_token is None else f"{r.cpu_us_per_token:.1f}" for r in runs)]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenflow bench relay", description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="100,500,1000,2000", help="concurrency levels, comma-separated")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--upstream-rate", type=float, default=50.0, help="engine tokens/s per stream")
    p.add_argument("--pace-rate", type=float, default=20.0, help="smooth pacing rate (tokens/s per stream)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the ramp before measuring")
    p.add_argument("--window", type=float, default=10.0, help="measured seconds")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams open")
    p.add_argument("--loadgens", type=int, default=2, help="load generator processes")
    p.add_argument("--workers", default="1", help="gateway/nginx worker processes, comma-separated (e.g. 1,2); "
                   "N workers are pinned to N cores, the rig to the rest")
    p.add_argument("--streams-per-worker", action="store_true",
                   help="--streams counts streams per worker: N workers run N times each level (scaling runs)")
    p.add_argument("--upstreams", type=int, default=1,
                   help="fast engine processes sharing the engine port (SO_REUSEPORT), so the engine is not the limit")
    p.add_argument("--store", choices=("memory", "redis"), default="memory",
                   help="the gateway's session store (several workers always use redis)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--repeat", type=int, default=1, help="runs per case (medians reported)")
    p.add_argument("--nice", type=int, default=0,
                   help="run the proxies, engine and load generators at this niceness (negative: ahead of other "
                        "work on a shared machine; needs root)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the proxy to core 0 and the rig elsewhere")
    p.add_argument("--memory", type=int, default=0, metavar="N",
                   help="instead: the gateway's resident memory per idle paced stream, with N streams open")
    p.add_argument("--profile", action="store_true", help="py-spy profile of the gateway over each window (in --out)")
    p.add_argument("--out", help="output directory (default bench-results/relay-<time>)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_loadgen":
        return _loadgen_main(argv[1])
    a = _parser().parse_args(argv)
    global _NICE
    _NICE = a.nice
    _raise_nofile()
    out = Path(a.out or f"bench-results/relay-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    o = Options(tokens=a.tokens, upstream_rate=a.upstream_rate, pace_rate=a.pace_rate, warmup_s=a.warmup,
                window_s=a.window, ramp_s=a.ramp, loadgens=a.loadgens, pin=not a.no_pin,
                profile_dir=str(out / "profiles") if a.profile else None, store=a.store, redis_url=a.redis_url,
                upstreams=max(1, a.upstreams))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the proxies on the way out
    cmd = "tokenflow bench relay " + " ".join(argv)
    if a.memory:
        with tempfile.TemporaryDirectory() as tmp:
            m = memory_case(a.memory, o, Path(tmp))
        print(json.dumps(m, indent=2))
        (out / "memory.json").write_text(json.dumps({"command": cmd, **m}, indent=2))
        return 0
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"unknown target(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    if "nginx" in targets and find_nginx() is None:
        print("nginx is not installed (scripts/install-test-deps.sh installs nginx-light): skipping it",
              file=sys.stderr)
        targets.remove("nginx")
    levels = [int(x) for x in a.streams.split(",") if x.strip()]
    workers = [int(x) for x in str(a.workers).split(",") if x.strip()]
    results: list[CaseResult] = []
    start_load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            for n in case_streams(levels, w, a.streams_per_worker):
                for t in targets:
                    if w > 1 and t == "direct":
                        continue
                    runs = []
                    for i in range(a.repeat):
                        o.workers = w
                        r = run_case(t, n, o, Path(tmp) / f"{t}-{n}-{w}-{i}")
                        runs.append(r)
                        print(f"  {t:15s} x{w} {n:5d} streams: {_f(r.cpu_us_per_token)} µs/token, "
                              f"{r.delivered_tps:,.0f}/{r.offered_tps:,.0f} tok/s, TTFT p50 {_f(r.ttft_p50_ms)} ms, "
                              f"lateness p99 {_f(r.lateness_p99_ms)} ms, proxy {r.proxy_cpu_share:.2f} cores, "
                              f"rig {r.rig_cpu_share:.2f} cores, load {r.loadavg[0]:.1f}, errors {r.errors}"
                              + ("" if r.redis_cpu_share is None else f", redis {r.redis_cpu_share:.2f} cores"),
                              flush=True)
                    results.append(_median_case(runs))
                    (out / "partial.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    direct = {r.streams: r for r in results if r.target == "direct"}
    for r in results:
        d = direct.get(r.streams)
        if d is not None and r.target != "direct" and r.ttft_p50_ms is not None and d.ttft_p50_ms is not None:
            r.added_ttft_p50_ms = round(r.ttft_p50_ms - d.ttft_p50_ms, 3)
            r.added_ttft_p99_ms = round((r.ttft_p99_ms or 0) - (d.ttft_p99_ms or 0), 3)
    md = table(results)
    scale = scaling(results, a.streams_per_worker) if len(workers) > 1 else []
    if scale:
        md += "\n\nScaling (delivered tokens/s over one worker's at the same load):\n\n" + scaling_table(
            scale, a.streams_per_worker)
    print(md)
    print(f"load average at start {start_load[0]:.2f}, at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    (out / "report.json").write_text(json.dumps({"command": cmd, "options": asdict(o), "cpu_count": os.cpu_count(),
                                                 "loadavg_start": start_load, "results": [asdict(r) for r in results],
                                                 "scaling": scale},
                                                indent=2))
    (out / "table.md").write_text(md + "\n")
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
