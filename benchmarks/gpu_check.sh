#!/usr/bin/env bash
# Check clipib's CUDA path and benchmark one GPU (issues 7 and 20); at most ten minutes on one H100/H200 (the
# time limits of the steps add up to 600 s; most steps take far less).
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
#   bench_compile.json/.md     the same fast settings eager and compile=True at batch 128: pairs/s, compile seconds,
#                              graphs compiled, recompiles during the timed call (issue 20)
#   eval_gpu/                  eval.py on one GPU: configs/eval/demo.yaml's 5 methods and metrics on ViT-B-32-quickgelu
#                              (random weights), 256 shapes pairs, batch 64, 4 loader workers; summary.json "stages"
#   isolated_b64.json/.md      the same 5 methods alone at batch 64; pipeline.json/.md: the run vs their sum
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
echo "== 1/5 CUDA path checks"
timeout 110 "$PY" -m clipib.bench.cuda_checks --device cuda --out "$OUT/cuda_checks.json" > "$OUT/cuda_checks.log" 2>&1 \
  || { status=$?; echo "cuda checks failed (exit $status); see $OUT/cuda_checks.log"; }
tail -n 5 "$OUT/cuda_checks.log" || true

echo "== 2/5 benchmark, fp32, default settings, against the reference loops"
timeout 130 "$PY" -m clipib bench --device cuda --methods m2ib nib --batch-sizes 1 8 32 128 \
  --reference-pairs 2 --out "$OUT/bench_fp32.json" || status=$?

echo "== 3/5 benchmark, speed options (M2IB on-device noise + TF32, NIB TF32)"
timeout 80 "$PY" -m clipib bench --device cuda --methods m2ib nib --batch-sizes 32 128 256 \
  --reference-pairs 0 --no-flops \
  --settings '{"m2ib": {"noise": "device", "precision": "tf32"}, "nib": {"precision": "tf32"}}' \
  --out "$OUT/bench_fast.json" || status=$?

echo "== 4/5 compile=True against eager (fast settings, batch 128)"
FAST_M2IB='"noise": "device", "precision": "tf32"'
timeout 120 "$PY" -m clipib bench --device cuda --methods m2ib m2ib_compiled nib nib_compiled --batch-sizes 128 \
  --reference-pairs 0 --no-flops \
  --settings "{\"m2ib\": {$FAST_M2IB}, \"m2ib_compiled\": {\"method\": \"m2ib\", $FAST_M2IB, \"compile\": true},
               \"nib\": {\"precision\": \"tf32\"}, \"nib_compiled\": {\"method\": \"nib\", \"precision\": \"tf32\", \"compile\": true}}" \
  --out "$OUT/bench_compile.json" || status=$?

echo "== 5/5 eval.py on one GPU (demo methods, ViT-B/32, 256 pairs, batch 64), then the methods alone"
rm -rf "$OUT/eval_gpu"
timeout 100 "$PY" eval.py test -c configs/eval/demo.yaml --trainer.default_root_dir "$OUT/eval_gpu" \
  --trainer.accelerator gpu --trainer.devices 1 --model.model ViT-B-32-quickgelu --model.pretrained none \
  --data.init_args.batch_size 64 --data.init_args.num_workers 4 --data.init_args.dataset.init_args.size 256 \
  > "$OUT/eval_gpu.log" 2>&1 || { status=$?; echo "eval failed (exit $status); see $OUT/eval_gpu.log"; }
timeout 60 "$PY" -m clipib bench --device cuda --methods m2ib nib adaib grad_cam saliency --batch-sizes 64 \
  --reference-pairs 0 --no-flops --out "$OUT/isolated_b64.json" || status=$?
"$PY" -m clipib.bench.pipeline --summary "$OUT/eval_gpu/summary.json" --bench "$OUT/isolated_b64.json" \
  --batch-size 64 --out "$OUT/pipeline.json" || status=$?

exit $status
