#!/usr/bin/env bash
# Check clipib's CUDA path and benchmark one GPU (issue 7); under ten minutes on one H100/H200.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh          # from the repository root
#
# Random-weight ViT-B-32-quickgelu (no download). Writes under $OUT (default outputs/gpu_check):
#   gpu.txt                    nvidia-smi's card name, memory, driver
#   cuda_checks.json           placement, host-device syncs vs steps/chunks, device-vs-CPU / TF32 / bf16 /
#                              device-noise agreement, allocated memory over 1,000 pairs
#                              (python -m clipib.bench.cuda_checks)
#   bench_fp32.json/.md        M2IB + NIB, batches 1 8 32 128, fp32, official noise, vs the reference loops
#   bench_fast.json/.md        M2IB with noise="device" and TF32, NIB with TF32, batches 32 128 256
# Exit status: non-zero if a check fails or a step runs past its time limit.
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"

status=0
echo "== 1/3 CUDA path checks"
timeout 200 "$PY" -m clipib.bench.cuda_checks --device cuda --out "$OUT/cuda_checks.json" > "$OUT/cuda_checks.log" 2>&1 \
  || { status=$?; echo "cuda checks failed (exit $status); see $OUT/cuda_checks.log"; }
tail -n 5 "$OUT/cuda_checks.log" || true

echo "== 2/3 benchmark, fp32, default settings, against the reference loops"
timeout 200 "$PY" -m clipib bench --device cuda --methods m2ib nib --batch-sizes 1 8 32 128 \
  --reference-pairs 2 --out "$OUT/bench_fp32.json" || status=$?

echo "== 3/3 benchmark, speed options (M2IB on-device noise + TF32, NIB TF32)"
timeout 120 "$PY" -m clipib bench --device cuda --methods m2ib nib --batch-sizes 32 128 256 \
  --reference-pairs 0 --no-flops \
  --settings '{"m2ib": {"noise": "device", "precision": "tf32"}, "nib": {"precision": "tf32"}}' \
  --out "$OUT/bench_fast.json" || status=$?

exit $status
