#!/usr/bin/env bash
# The CPU targets of issue 20, measured back to back on one machine. Run from the repository root, when the
# machine is otherwise quiet (the numbers go into docs/benchmarks.md §3):
#
#   bash benchmarks/cpu_targets.sh                                        # full run
#   SMOKE=1 OUT=outputs/cpu_targets_smoke bash benchmarks/cpu_targets.sh  # plumbing check: tiny model, few pairs
#   STEPS=pipeline bash benchmarks/cpu_targets.sh                         # only target 4 (STEPS=targets: only 3)
#
# PYTHON= picks the interpreter (default: python). Writes under $OUT (default outputs/cpu_targets):
#   uptime.txt             `uptime` before and after every step (the load the numbers were measured under)
#   targets_b8.json/.md    target 3: M2IB and NIB, eager and compile=True, batch 8, both maps, ViT-B-32-quickgelu
#                          (random weights), 2 threads, beside the reference-shaped loops (1 pair, timed with and
#                          without weight gradients), FLOP floor and measured matmul rate, compile counts
#   demo/                  target 4: eval.py on configs/eval/demo.yaml (5 methods, 64 pairs, batch 16) with 2 loader
#                          workers; demo/summary.json has the per-stage breakdown ("stages")
#   isolated_b16.json/.md  the demo's methods alone at batch 16 on the same model, right after the run
#   pipeline.json/.md      the run's seconds per pair against the isolated methods' sum (target: ratio <= 1.10)
# Exit status: non-zero if a step fails.
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-outputs/cpu_targets}
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-targets pipeline}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=2

if [ "$SMOKE" = 1 ]; then
  MODEL=tests/data/tiny-clip.json; BATCH=2; PAIRS=8; EVAL_BATCH=4
else
  MODEL=ViT-B-32-quickgelu; BATCH=8; PAIRS=64; EVAL_BATCH=16
fi
DEMO_METHODS="m2ib nib adaib grad_cam saliency"
stamp() { echo "$(date -u '+%F %T UTC') $1: $(uptime)" | tee -a "$OUT/uptime.txt"; }

stamp "start (SMOKE=$SMOKE, STEPS=$STEPS)"
if [[ " $STEPS " == *" targets "* ]]; then
echo "== 1/3 target 3: M2IB / NIB eager and compiled at batch $BATCH beside the reference loops ($MODEL)"
"$PY" -m clipib bench --model "$MODEL" --pretrained none --threads 2 --batch-sizes "$BATCH" --reference-pairs 1 \
  --methods m2ib nib m2ib_compiled nib_compiled \
  --settings '{"m2ib_compiled": {"method": "m2ib", "compile": true}, "nib_compiled": {"method": "nib", "compile": true}}' \
  --out "$OUT/targets_b$BATCH.json"
stamp "after targets"
fi

if [[ " $STEPS " == *" pipeline "* ]]; then
echo "== 2/3 target 4: eval.py demo-like run (batch $EVAL_BATCH, 2 loader workers, $PAIRS pairs), then its methods alone"
rm -rf "$OUT/demo"  # a leftover run folder would resume (and skip) every pair
"$PY" eval.py test -c configs/eval/demo.yaml --trainer.default_root_dir "$OUT/demo" \
  --data.init_args.num_workers 2 --data.init_args.batch_size "$EVAL_BATCH" \
  --data.init_args.dataset.init_args.size "$PAIRS" > "$OUT/demo.log" 2>&1 \
  || { tail -n 30 "$OUT/demo.log"; exit 1; }
stamp "after eval run"
# shellcheck disable=SC2086
"$PY" -m clipib bench --model clipib-shapes --pretrained default --threads 2 --batch-sizes "$EVAL_BATCH" \
  --reference-pairs 0 --no-flops --methods $DEMO_METHODS --out "$OUT/isolated_b$EVAL_BATCH.json"
stamp "after isolated methods"

echo "== 3/3 the run against the isolated sum"
"$PY" -m clipib.bench.pipeline --summary "$OUT/demo/summary.json" --bench "$OUT/isolated_b$EVAL_BATCH.json" \
  --batch-size "$EVAL_BATCH" --out "$OUT/pipeline.json"
fi
stamp "end"
