#!/usr/bin/env bash
# This machine's side of a GPU sitting (docs/vllm-backend.md, "On a GPU"): build the offline kit for the GPU
# machine's image and lay it out for carrying, one folder per piece under .kit/ (ignored through .git/info/exclude),
# kit.json with the last piece. A command carries the working tree and its carried folders, at most CARRY_MIB
# (64) in all, so each piece is sized from what the tree weighs now, less MARGIN_MIB: the raw results committed
# under docs/bench/ grow the tree from one sitting to the next (a 45 MiB piece came within 0.3 MB of the limit).
#
#   scripts/gpu/kit-pieces.sh [REQUIREMENT ...]     # default: vllm==0.26.0 py-spy
#
# Prints the piece folders in the order to carry them: each with `scripts/gpu/device.sh piece DIR`, the last
# one together with `scripts/gpu/device.sh install`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CARRY_MIB="${CARRY_MIB:-64}"
MARGIN_MIB="${MARGIN_MIB:-3}"
KIT_DIR="${KIT_DIR:-/tmp/kit}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
[ $# -gt 0 ] || set -- vllm==0.26.0 py-spy

# what a command carries besides the pieces: tracked and untracked files git does not ignore
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
tree_mib=$(( (tree_bytes + 1048575) / 1048576 ))
piece_mib=$(( CARRY_MIB - MARGIN_MIB - tree_mib ))
if [ "$piece_mib" -lt 8 ]; then
  echo "kit-pieces: the tree weighs $tree_mib MiB of the $CARRY_MIB MiB a command carries: no room for a piece" >&2
  exit 1
fi
echo "kit-pieces: tree $tree_mib MiB, pieces of $piece_mib MiB" >&2

rm -rf "$KIT_DIR"
"$PY" scripts/offline-kit/kit.py build --out "$KIT_DIR" --base scripts/offline-kit/bases/nvidia-h200-cuda.txt \
  --python 3.12 --project '.[test]' --project backends/vllm --piece-mib "$piece_mib" "$@" >&2

mkdir -p .git/info
grep -qx '.kit/' .git/info/exclude 2>/dev/null || echo '.kit/' >> .git/info/exclude
rm -rf .kit
pieces=("$KIT_DIR"/kit.tar.*)
for i in "${!pieces[@]}"; do
  mkdir -p ".kit/p$i"
  ln "${pieces[$i]}" ".kit/p$i/" 2>/dev/null || cp "${pieces[$i]}" ".kit/p$i/"
  echo ".kit/p$i"
done
last=$(( ${#pieces[@]} - 1 ))
ln "$KIT_DIR/kit.json" ".kit/p$last/" 2>/dev/null || cp "$KIT_DIR/kit.json" ".kit/p$last/"
