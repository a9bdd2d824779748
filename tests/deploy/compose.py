"""Read the shipped docker-compose.yml through ``docker-compose config`` (interpolated, merged, validated)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
INSTALL_HINT = "scripts/install-test-deps.sh installs it"


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    assert exe, f"docker-compose (Debian's 1.29 validates without a Docker engine) is missing: {INSTALL_HINT}"
    return exe


def run_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose [args] config`` on the shipped file, with ``env`` as the only interpolation source
    (no .env file of the developer's is read: --env-file points at an empty one)."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run(
            [docker_compose(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", empty.name,
             *args, "config"],
            env={**base, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )


def load(env: dict[str, str], profile: str) -> dict[str, Any]:
    """The resolved compose model with ``profile`` enabled; services of other profiles are dropped."""
    proc = run_config(env, "--profile", profile)
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)
    model["services"] = {
        name: svc for name, svc in model["services"].items() if not svc.get("profiles") or profile in svc["profiles"]
    }
    return model


def aliases(service: dict[str, Any]) -> list[str]:
    out = []
    for net in (service.get("networks") or {}).values():
        out += (net or {}).get("aliases") or []
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of the service's bind mounts."""
    out = {}
    for v in service.get("volumes") or ():
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v.get("source", ""), v["target"]
        if src.startswith("/"):
            out[dst] = src
    return out
