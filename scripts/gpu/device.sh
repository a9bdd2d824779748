#!/usr/bin/env bash
# The GPU machine's side of docs/vllm-backend.md, "On a GPU": a machine with no network that receives the
# offline kit (scripts/offline-kit/kit.py) in pieces, installs it, and runs the phases of bench/vllm_gpu.py.
# Run from the repository root there (python3 is the machine's, with torch):
#
#   scripts/gpu/device.sh piece DIR         # move one carried piece of the kit (DIR/kit.*) to /tmp/kit
#   scripts/gpu/device.sh install           # verify and install the kit into /tmp/site; build the models
#   scripts/gpu/device.sh check SCRIPT [ARGS...]   # python3 backends/vllm/SCRIPT ARGS, output in $OUT/SCRIPT-*.log
#   scripts/gpu/device.sh PHASE [ARGS...]   # python3 -m bench.vllm_gpu PHASE ARGS, packed as $OUT/PHASE-*.tgz
#
# TF_PHASE_LIMIT_S=N stops the phase after N seconds and still packs what it wrote: set it below the call's own
# limit, or a phase that runs long returns nothing (the machine keeps no files once the call is over).
#
# Installed packages go to /tmp/site (on PYTHONPATH), not into the machine's environment. The plugin and the
# gateway run from this checkout (first on PYTHONPATH), so a kit built from an older commit still runs the
# current code.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/backends/vllm:$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH" TOKENFLOW_MODELS=/tmp/tokenflow-models PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/tf-out}"
mkdir -p "$OUT" /tmp/kit /tmp/tf-runs
stamp=$(date +%H%M%S)

case "${1:-}" in
  piece)
    mv "$2"/kit.* /tmp/kit/ && ls -la /tmp/kit | tail -n +2 | awk '{print $5, $9}'
    ;;
  install)
    { nvidia-smi; python3 --version; python3 -m pip freeze; } > "$OUT/machine-$stamp.txt" 2>&1
    python3 "$ROOT/scripts/offline-kit/kit.py" install /tmp/kit --target /tmp/site \
      --check-import vllm --check-import tokenflow_vllm --check-import gateway.cli || exit 1
    python3 -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
    python3 -m bench.vllm_gpu models
    ;;
  check)
    script="$2"; shift 2
    python3 "$ROOT/backends/vllm/$script" "$@" 2>&1 | tee "$OUT/${script%.py}-$stamp.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    phase="$1"; shift
    dir="/tmp/tf-runs/$phase-$stamp"
    limit=()
    [ -n "${TF_PHASE_LIMIT_S:-}" ] && limit=(timeout -k 15 "$TF_PHASE_LIMIT_S")
    "${limit[@]}" python3 -m bench.vllm_gpu "$phase" --out "$dir" "$@" 2>&1 | tee "$dir.log"
    rc=${PIPESTATUS[0]}
    tar czf "$OUT/$phase-$stamp.tgz" -C /tmp/tf-runs "$phase-$stamp" "$phase-$stamp.log"
    exit "$rc"
    ;;
esac
