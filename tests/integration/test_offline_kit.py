"""The offline kit (scripts/offline-kit/kit.py): built here from PyPI, carried in pieces, verified and installed
with nothing but pip and the standard library, as on an air-gapped GPU server.

The kit under test is small (a pure-Python requirement with a dependency, and the TokenFlow plugin built
from this checkout) and targets this machine's Python, so the install can really run here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "scripts" / "offline-kit" / "kit.py"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, **kw)


def test_a_kit_in_pieces_installs_offline_and_refuses_a_damaged_piece(tmp_path: Path) -> None:
    base = tmp_path / "base.txt"
    base.write_text("six==1.17.0\n")  # the server has six already: it must not be packed
    out = tmp_path / "kit"
    p = run(str(KIT), "build", "--out", str(out), "--base", str(base), "--python", PY, "--piece-mib", "1",
            "--project", str(ROOT / "backends" / "vllm"), "--cache", str(tmp_path / "cache"),
            "python-dateutil==2.9.0.post0", "tabulate==0.9.0")  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((out / "kit.json").read_text())
    wheels = set(doc["manifest"]["wheels"])
    names = {w.split("-")[0].lower() for w in wheels}
    assert names == {"python_dateutil", "tabulate", "tokenflow_vllm"}, wheels  # six: the server's own
    assert doc["manifest"]["server_has"] == {"six": "1.17.0"}
    assert len(doc["pieces"]) >= 1 and all(p["bytes"] <= 1 << 20 for p in doc["pieces"])

    target = tmp_path / "site"
    p = run(str(out / "kit.py"), "install", str(out), "--target", str(target), "--check-import", "tabulate",
            "--check-import", "tokenflow_vllm.launch")  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verified" in p.stdout and "imports ok" in p.stdout
    installed = {d.name.split("-")[0].lower() for d in target.glob("*.dist-info")}
    assert {"python_dateutil", "tabulate", "tokenflow_vllm"} <= installed

    # One flipped byte in a piece: nothing is installed, and the damaged piece is named.
    piece = out / doc["pieces"][0]["name"]
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.write_bytes(bytes(data))
    p = run(str(out / "kit.py"), "install", str(out), "--target", str(tmp_path / "site2"))
    assert p.returncode == 2 and doc["pieces"][0]["name"] in p.stderr
    assert not (tmp_path / "site2").exists()
