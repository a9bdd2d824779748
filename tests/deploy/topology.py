"""The compose topology (Redis, simulated engines, gateway replicas, nginx) as local processes.

Everything is taken from ``docker-compose --profile sim config`` of the shipped file: each service's command,
environment and mounted config files. Only what a container gets from Docker is replaced: the host names of
other services become 127.0.0.1 with a free port, container paths become the mounted repository files, and
each process listens on its own port. The nginx config is the shipped file with the same substitutions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy.compose import INSTALL_HINT, ROOT, aliases, load, mounts
from tests.support.procs import Proc, free_port

CONTROL_TOKEN = "topology-control-token"
_URL_HOST = re.compile(r"(?<=//)([A-Za-z0-9_.-]+):(\d+)")


def find_nginx() -> str:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    assert exe, f"nginx is missing: {INSTALL_HINT}"
    return exe


@dataclass
class Topology:
    workdir: Path
    compose: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)  # compose host name (service or alias) -> local port
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def lb_url(self) -> str:
        return self.procs["lb"].url

    def service(self, name: str) -> dict[str, Any]:
        return self.compose["services"][name]

    # --- substitutions: what Docker would have provided ---
    def localize(self, value: str, svc: dict[str, Any]) -> str:
        """Service host names in URLs -> 127.0.0.1:<local port>; mounted container paths -> repository files."""

        def host(m: re.Match[str]) -> str:
            name = m.group(1)
            return f"127.0.0.1:{self.ports[name]}" if name in self.ports else m.group(0)

        value = _URL_HOST.sub(host, value)
        for dst, src in mounts(svc).items():
            if value == dst or value.startswith(dst + "/"):
                value = src + value[len(dst):]
        return value

    def start(self, name: str, argv: list[str], env: dict[str, str], url: str) -> Proc:
        proc = self.procs[name] = Proc(name, argv, self.workdir, env=env, cwd=self.workdir, url=url)
        return proc

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONPATH": str(ROOT)}


def nginx_config(shipped: str, upstreams: dict[str, int], listen_port: int, workdir: Path, buffered: bool = False
                 ) -> str:
    """The shipped nginx.conf with upstream addresses, the listen port and writable temp paths localized.

    ``buffered`` makes the proxy buffer: the negative control showing the streaming test detects buffering.
    """
    conf = shipped
    for host, port in upstreams.items():
        conf, n = re.subn(rf"(\bserver\s+){re.escape(host)}:\d+", rf"\g<1>127.0.0.1:{port}", conf)
        assert n == 1, f"upstream {host} not found exactly once in the shipped nginx.conf"
    conf, n = re.subn(r"\blisten\s+8000;", f"listen 127.0.0.1:{listen_port};", conf)
    assert n == 1, "the shipped nginx.conf must listen on 8000 (the port docker-compose.yml publishes)"
    temp = "".join(f"    {d}_temp_path {workdir / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    if buffered:  # a common misconfiguration: proxy buffering on, and compression of event streams
        conf, n = re.subn(r"proxy_buffering off;", "proxy_buffering on;", conf)
        conf, m = re.subn(r"gzip off;", "gzip on; gzip_types text/event-stream; gzip_min_length 0;", conf)
        assert n == 1 and m == 1
    return conf


def start_topology(workdir: Path, *, lb_buffered: bool = False) -> Topology:
    compose = load({"TOKENFLOW_CONTROL_TOKEN": CONTROL_TOKEN}, "sim")
    topo = Topology(workdir, compose)
    services = compose["services"]
    engines = sorted(n for n, s in services.items() if "sim" in (s.get("profiles") or ()))
    gateways = sorted(n for n in services if n.startswith("gateway-"))
    assert len(engines) == 2 and len(gateways) == 2, (engines, gateways)
    for name in ["redis", *engines, *gateways, "lb"]:
        port = free_port()
        topo.ports[name] = port
        for a in aliases(services[name]):
            topo.ports[a] = port
    try:
        # Redis: the service's own command line, on a local port.
        redis = services["redis"]
        argv = [shutil.which("redis-server") or "redis-server", *redis["command"][1:],
                "--bind", "127.0.0.1", "--port", str(topo.ports["redis"])]
        topo.start("redis", argv, base_env(), f"redis://127.0.0.1:{topo.ports['redis']}")
        _wait_redis(topo)

        # Engines and gateways: the image's entrypoint is `tokenflow` (gateway/cli.py).
        for name in [*engines, *gateways]:
            svc = services[name]
            env = base_env() | {k: topo.localize(str(v), svc) for k, v in (svc.get("environment") or {}).items()}
            argv = [topo.localize(str(a), svc) for a in svc["command"]]
            if name in engines:
                argv = _set_flag(_set_flag(argv, "--host", "127.0.0.1"), "--port", str(topo.ports[name]))
            else:
                env |= {"TOKENFLOW_SERVER__HOST": "127.0.0.1", "TOKENFLOW_SERVER__PORT": str(topo.ports[name])}
            topo.start(name, [sys.executable, "-m", "gateway.cli", *argv], env, f"http://127.0.0.1:{topo.ports[name]}")
        for name in engines:
            topo.procs[name].wait_http("/health")
        for name in gateways:
            topo.procs[name].wait_http("/readyz")  # ready = both engines' control APIs answer (token)

        # nginx: the shipped config.
        lb = services["lb"]
        shipped = Path(mounts(lb)["/etc/nginx/nginx.conf"]).read_text()
        conf_path = workdir / "nginx.conf"
        conf_path.write_text(nginx_config(shipped, {g: topo.ports[g] for g in gateways}, topo.ports["lb"], workdir,
                                          buffered=lb_buffered))
        directives = f"daemon off; pid {workdir / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
        nginx = find_nginx()
        check = subprocess.run([nginx, "-t", "-p", str(workdir), "-c", str(conf_path), "-g", directives],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        topo.start("lb", [nginx, "-p", str(workdir), "-c", str(conf_path), "-g", directives], base_env(),
                   f"http://127.0.0.1:{topo.ports['lb']}")
        topo.procs["lb"].wait_http("/lb-health")
        return topo
    except BaseException:
        topo.stop()
        raise


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2:]]


def _wait_redis(topo: Topology, timeout: float = 30.0) -> None:
    proc = topo.procs["redis"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"redis exited:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", topo.ports["redis"]), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"redis not answering:\n{proc.tail()}")
