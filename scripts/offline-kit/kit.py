#!/usr/bin/env python3
"""An offline install kit for a GPU server without internet: vLLM, what it needs that the server lacks, the
TokenFlow plugin and the gateway, as wheels in checksummed pieces of a chosen size.

Build it on a machine that reaches PyPI (docs/deploy.md, "Air-gapped GPU servers"):

    python scripts/offline-kit/kit.py build --out kit --base scripts/offline-kit/bases/nvidia-h200-cuda.txt \\
        --python 3.12 --piece-mib 60 vllm==0.26.0

``--base`` describes what the server already has (a ``pip freeze`` of it; bare names mean "present, version
unknown"). The builder walks the dependency tree of the requirements for the server's Python and platform
and keeps every package the server lacks, or has in a version that does not satisfy what requires it.
Packages the server provides in an unknown version are kept too when their wheel is small (under
``--small-mib``): the installer keeps the server's copy where it satisfies, so a small extra wheel costs
nothing and a wrong guess costs no round trip. The accelerator stack (torch, triton, nvidia-*, ...) is never
packed: the server's must stay. ``--omit`` drops optional kernel packages a model does not use.

Carry the pieces (``kit.tar.000``, ``kit.tar.001``, ... and ``kit.json``) to the server, then, with only the
Python standard library and pip there:

    python3 kit.py install PIECES_DIR [--target DIR]

which checks every piece's SHA-256, joins them, checks every wheel's SHA-256 against the manifest, and
installs the wheels with pip (no index, no dependency resolution: the kit is the resolution), then imports
each top-level requirement and prints ``pip check``'s view of what is still missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

MANIFEST = "kit.json"
TAR = "kit.tar"
# Never packed: the server's accelerator stack must stay as it is (vLLM pins torch to the server's version).
PLATFORM_PACKAGES = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton")
PLATFORM_PREFIXES = ("nvidia-", "cuda-")
# Optional kernels vLLM 0.26 declares that a dense Llama-family model in bf16 never imports (about 1 GB).
DEFAULT_OMIT = (
    "tilelang", "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "humming-kernels", "pynvvideocodec",
    "torchcodec", "fastsafetensors", "flashinfer-cubin",
)
MANYLINUX = ("manylinux_2_{}_x86_64", range(17, 40))


class DownloadError(SystemExit):
    pass


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- build


def read_base(path: Path | None) -> dict[str, str | None]:
    """``pip freeze`` lines (``name==version``) or bare names -> {normalized name: version or None}."""
    out: dict[str, str | None] = {}
    if path is None:
        return out
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        out[norm(name.split("@")[0].strip())] = version.strip() or None
    return out


class Builder:
    def __init__(self, args: argparse.Namespace) -> None:
        from packaging.markers import default_environment

        self.args = args
        self.base = read_base(args.base)
        self.omit = {norm(n) for n in (*DEFAULT_OMIT, *args.omit)} - {norm(n) for n in args.keep}
        py = args.python
        self.env = {
            **default_environment(),
            "python_version": py,
            "python_full_version": f"{py}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
            "os_name": "posix",
        }
        self.platforms = ["linux_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
            MANYLINUX[0].format(n) for n in MANYLINUX[1]
        ]
        # One cache folder per target Python: every wheel in it was chosen by pip for that target.
        self.cache = Path(args.cache).expanduser() / f"py{py}-x86_64"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._extras: dict[str, set[str]] = {}  # extras already followed, per package
        self.conflicts: dict[str, list[str]] = {}
        self.forced: set[str] = set()  # versions a conflict forced (the requirement nearest the root won)

    def download(self, spec: str) -> Path:
        """The best wheel for the server of ``spec`` (from the cache when there), no dependencies."""
        before = set(self.cache.iterdir())
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", self.args.python, "--implementation", "cp",
               "--abi", "cp" + self.args.python.replace(".", ""), "--abi", "abi3", "--abi", "none",
               *[x for p in self.platforms for x in ("--platform", p)], "--platform", "any",
               "-d", str(self.cache), spec]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = "\n".join(x for x in p.stderr.splitlines() if "is neither a file nor a directory" not in x)
            raise DownloadError(f"kit: cannot download {spec} for Python {self.args.python}:\n{err[-2000:]}")
        new = set(self.cache.iterdir()) - before
        if new:
            return max(new, key=lambda f: f.stat().st_mtime)
        # Already cached: pip names the file it used in its output; otherwise pick by name and spec.
        return self._cached(spec)

    def _cached(self, spec: str) -> Path:
        from packaging.requirements import Requirement
        from packaging.utils import parse_wheel_filename

        req = Requirement(spec)
        best = None
        for f in self.cache.glob("*.whl"):
            name, version, _, _ = parse_wheel_filename(f.name)
            if (norm(name) == norm(req.name) and version in req.specifier
                    and (best is None or version > best[0])):
                best = (version, f)
        if best is None:
            raise SystemExit(f"kit: pip reported {spec} as present but no cached wheel matches")
        return best[1]

    def build(self) -> None:
        from packaging.requirements import Requirement
        from packaging.utils import parse_wheel_filename
        from packaging.version import Version

        out = Path(self.args.out)
        wheels = out / "wheels"
        if out.exists():
            shutil.rmtree(out)
        wheels.mkdir(parents=True)
        specs: dict[str, list[Requirement]] = {}  # name -> every requirement met on the way
        chosen: dict[str, Path] = {}
        kept_base: dict[str, str] = {}
        queue = [Requirement(r) for r in self.args.requirements]
        # Local projects (``PATH`` or ``PATH[extra,...]``): their wheels go in as built; what they require joins
        # the walk.
        built: list[Path] = []
        for project in self.args.project:
            path, _, extras = project.partition("[")
            into = Path(tempfile.mkdtemp(prefix="tokenflow-kit-build-"))
            p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into), path],
                               capture_output=True, text=True)  # fmt: skip
            if p.returncode != 0:
                raise SystemExit(f"kit: cannot build a wheel of {path}:\n{p.stderr[-2000:]}")
            (whl,) = into.glob("*.whl")
            built.append(whl)
            wanted = ("", *filter(None, extras.rstrip("]").split(",")))
            for dep in self._requires(whl):
                d = Requirement(dep)
                if d.marker is None or any(d.marker.evaluate({**self.env, "extra": e}) for e in wanted):
                    d.marker = None
                    queue.append(d)
        while queue:
            req = queue.pop(0)
            if req.marker is not None and not req.marker.evaluate({**self.env, "extra": ""}):
                continue
            name = norm(req.name)
            if name in self.omit or name in PLATFORM_PACKAGES or name.startswith(PLATFORM_PREFIXES):
                continue
            specs.setdefault(name, []).append(req)
            have = self.base.get(name, "absent")
            if have not in ("absent", None) and all(Version(have) in r.specifier for r in specs[name]):
                kept_base[name] = have
                chosen.pop(name, None)
                continue
            if name in chosen:
                _, v, _, _ = parse_wheel_filename(chosen[name].name)
                if all(v in r.specifier for r in specs[name]) and not (req.extras - self._extras_done(name)):
                    continue
            combined = ",".join(str(r.specifier) for r in specs[name] if str(r.specifier))
            try:
                whl = self.download(f"{req.name}{combined}")
            except DownloadError:
                # Requirements that no version meets at once (vLLM pins some packages below what its own
                # dependencies ask): the requirement nearest the root wins, as an install of the root does.
                first = specs[name][0]
                whl = self.download(f"{first.name}{first.specifier}")
                self.conflicts[name] = [str(r) for r in specs[name]]
                self.forced.add(name)
            if have not in ("absent", None) and parse_wheel_filename(whl.name)[1] < Version(have):
                # Never downgrade what the server has (other packages there are built against it): keep
                # the server's newer copy and say so.
                self.conflicts[name] = [f"server has {have}", *(str(r) for r in specs[name])]
                kept_base[name] = have
                continue
            chosen[name] = whl
            kept_base.pop(name, None)
            self._extras.setdefault(name, set()).update(req.extras)
            for dep in self._requires(whl):
                d = Requirement(dep)
                if d.marker is None or any(d.marker.evaluate({**self.env, "extra": e}) for e in ("", *req.extras)):
                    d.marker = None
                    queue.append(d)
        self._settle(chosen, kept_base)
        # Present in an unknown version: keep small wheels (free if unneeded), leave big ones to the server.
        dropped = {}
        for name, whl in list(chosen.items()):
            if self.base.get(name, "absent") is None and whl.stat().st_size > self.args.small_mib * 2**20:
                dropped[name] = whl.name
                del chosen[name]
        for whl in [*chosen.values(), *built]:
            shutil.copy2(whl, wheels / whl.name)
        for whl in built:
            shutil.rmtree(whl.parent)
        manifest = {
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": self.args.python,
            "requirements": self.args.requirements,
            "projects": [Path(p).resolve().name for p in self.args.project],
            "wheels": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size} for f in sorted(wheels.iterdir())},
            "server_has": kept_base,
            "left_to_server_unknown_version": dropped,
            "omitted": sorted(self.omit),
            "conflicts": self.conflicts,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.copy2(__file__, out / "kit.py")
        self.pack(out, manifest)

    def _settle(self, chosen: dict[str, Path], kept_base: dict[str, str]) -> None:
        """Where a conflict forced a version (the requirement nearest the root won), a package whose newest
        release wants another version of it is stepped back to a release that accepts the forced one (vLLM
        0.26 pins apache-tvm-ffi 0.1.10; xgrammar 0.2.8+ wants 0.1.11 and fails to import beside 0.1.10).
        The requirements themselves are never stepped back."""
        from packaging.requirements import Requirement
        from packaging.utils import parse_wheel_filename
        from packaging.version import Version

        def version_of(name: str) -> Version | None:
            if name in chosen:
                return parse_wheel_filename(chosen[name].name)[1]
            return Version(kept_base[name]) if name in kept_base else None

        roots = {norm(Requirement(r).name) for r in self.args.requirements}
        for name in [n for n in chosen if n not in roots]:
            for _ in range(8):
                bad = []
                for dep in self._requires(chosen[name]):
                    d = Requirement(dep)
                    if d.marker is not None and not d.marker.evaluate({**self.env, "extra": ""}):
                        continue
                    v = version_of(norm(d.name))
                    if norm(d.name) in self.forced and v is not None and v not in d.specifier:
                        bad.append(d)
                if not bad:
                    break
                current = parse_wheel_filename(chosen[name].name)[1]
                try:
                    chosen[name] = self.download(f"{name}<{current}")
                except DownloadError:
                    break
                self.conflicts.setdefault(name, []).append(
                    f"{name} {current} wants {'; '.join(map(str, bad))}: stepped back to "
                    f"{parse_wheel_filename(chosen[name].name)[1]}")

    def _extras_done(self, name: str) -> set[str]:
        return self._extras.get(name, set())

    @staticmethod
    def _requires(whl: Path) -> list[str]:
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
        return [line[len("Requires-Dist:"):].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]

    def pack(self, out: Path, manifest: dict) -> None:
        """One tar of wheels, manifest and installer, cut into pieces of --piece-mib, each checksummed."""
        tar_path = out / TAR
        with tarfile.open(tar_path, "w") as t:
            for f in sorted((out / "wheels").iterdir()):
                t.add(f, arcname=f"wheels/{f.name}")
            t.add(out / MANIFEST, arcname=MANIFEST)
            t.add(out / "kit.py", arcname="kit.py")
        size = self.args.piece_mib * 2**20
        pieces = []
        with open(tar_path, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(size), b"")):
                piece = out / f"{TAR}.{i:03d}"
                piece.write_bytes(chunk)
                pieces.append({"name": piece.name, "sha256": hashlib.sha256(chunk).hexdigest(), "bytes": len(chunk)})
        tar_path.unlink()
        shutil.rmtree(out / "wheels")
        pieces_doc = {"tar_sha256": None, "pieces": pieces, "manifest": manifest}
        (out / MANIFEST).write_text(json.dumps(pieces_doc, indent=1))
        total = sum(p["bytes"] for p in pieces)
        print(f"kit: {len(manifest['wheels'])} wheels, {total / 2**20:.1f} MiB in {len(pieces)} pieces of at most "
              f"{self.args.piece_mib} MiB in {out}")
        for name, w in sorted(manifest["wheels"].items(), key=lambda kv: -kv[1]["bytes"])[:8]:
            print(f"  {w['bytes'] / 2**20:7.1f} MiB  {name}")
        for name, reqs in manifest["conflicts"].items():
            print(f"  conflicting requirements on {name}: {'; '.join(reqs)}")
        if manifest["left_to_server_unknown_version"]:
            print("  the server's own copy is assumed for: "
                  + ", ".join(sorted(manifest["left_to_server_unknown_version"])))


# ---------------------------------------------------------------------------------------------- install


def install(args: argparse.Namespace) -> int:
    src = Path(args.pieces)
    doc = json.loads((src / MANIFEST).read_text())
    work = Path(tempfile.mkdtemp(prefix="tokenflow-kit-"))
    try:
        joined = work / TAR
        with open(joined, "wb") as out:
            for p in doc["pieces"]:
                data = (src / p["name"]).read_bytes()
                if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
                    print(f"kit: piece {p['name']} is damaged or incomplete (checksum mismatch)", file=sys.stderr)
                    return 2
                out.write(data)
        with tarfile.open(joined) as t:
            t.extractall(work, filter="data")
        joined.unlink()
        manifest = doc["manifest"]
        for name, w in manifest["wheels"].items():
            if sha256(work / "wheels" / name) != w["sha256"]:
                print(f"kit: wheel {name} does not match the manifest", file=sys.stderr)
                return 2
        print(f"kit: {len(doc['pieces'])} pieces and {len(manifest['wheels'])} wheels verified", flush=True)
        files = [str(work / "wheels" / n) for n in manifest["wheels"]]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", *files]  # fmt: skip
        if args.target:
            cmd += ["--target", args.target, "--upgrade"]
        t0 = time.monotonic()
        p = subprocess.run(cmd)
        if p.returncode != 0:
            return p.returncode
        print(f"kit: installed in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = dict(os.environ)
    if args.target:
        env["PYTHONPATH"] = args.target + os.pathsep + env.get("PYTHONPATH", "")
    mods = list(args.check_import)
    if mods:
        p = subprocess.run([sys.executable, "-c", "import " + ", ".join(mods) + "; print('kit: imports ok')"], env=env)
        if p.returncode != 0:
            return p.returncode
    check = subprocess.run([sys.executable, "-m", "pip", "check"], env=env, capture_output=True, text=True)
    missing = [line for line in check.stdout.splitlines() if line.strip()]
    omitted = set(manifest.get("omitted", []))
    unexpected = [line for line in missing if not any(norm(o) in norm(line.split(" requires ")[-1]) for o in omitted)]
    print(f"kit: pip check: {len(missing)} unmet requirements, {len(missing) - len(unexpected)} of them omitted "
          f"on purpose (optional kernels)")
    for line in unexpected[:20]:
        print("  " + line)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a kit here (needs pip access to PyPI and the packaging library)")
    b.add_argument("requirements", nargs="+", help="what to install on the server, e.g. vllm==0.26.0")
    b.add_argument("--out", required=True)
    b.add_argument("--base", type=Path, help="what the server has: pip freeze output or bare names")
    b.add_argument("--python", default="3.12", help="the server's Python, major.minor")
    b.add_argument("--project", action="append", default=[], help="a local project to pack as a wheel (repeatable)")
    b.add_argument("--omit", action="append", default=[], help="another package never to pack (repeatable)")
    b.add_argument("--keep", action="append", default=[], help="pack this one even if omitted by default")
    b.add_argument("--piece-mib", type=int, default=60)
    b.add_argument("--small-mib", type=float, default=2.0)
    b.add_argument("--cache", default="~/.cache/tokenflow/kit-wheels", help="downloaded wheels, kept between builds")
    i = sub.add_parser("install", help="verify and install a kit on the server (standard library and pip only)")
    i.add_argument("pieces", help="the folder holding kit.json and kit.tar.NNN")
    i.add_argument("--target", help="install into this folder (then put it on PYTHONPATH) instead of the environment")
    i.add_argument("--check-import", action="append", default=[], help="a module to import afterwards (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        Builder(args).build()
        return 0
    return install(args)


if __name__ == "__main__":
    sys.exit(main())
