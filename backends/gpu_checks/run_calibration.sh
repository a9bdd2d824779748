#!/usr/bin/env bash
# The GPU-side calibration run (docs/calibration.md): card and software, the offload copy check, then the
# cost-model measurements. Run from the repository root on the CUDA machine; results go to ${OUT:-.calib}/.
set -u
out=${OUT:-.calib}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm \
    --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/env.txt"
if [ -z "${SKIP_OFFLOAD:-}" ]; then
  timeout "${OFFLOAD_TIMEOUT:-150}" python3 -m backends.gpu_checks.cuda_offload_check --out "$out/offload.json" \
    > "$out/offload.log" 2>&1
  echo "offload check rc=$?"
  tail -25 "$out/offload.log"
fi
timeout "${CALIB_TIMEOUT:-400}" python3 -m backends.sim.calibrate measure --budget-s "${CALIB_BUDGET:-330}" \
  --out "$out/h100-llama3-8b.json" > "$out/calib.log" 2>&1
echo "calibrate rc=$?"
tail -70 "$out/calib.log"
