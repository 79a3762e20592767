#!/usr/bin/env bash
# Guided distillation stage 1 on the bundled proxy teacher on a CUDA GPU, then `fewstep bench --set guided`.
# Results go to ${OUT:-bench/results}. STEPS (default 2000, the proxy preset) shrinks to what fits in
# TRAIN_SECONDS (default 240), judged from the first 100 steps; the run resumes from its checkpoint.
set -u
out=${OUT:-bench/results}
run=$(mktemp -d)
mkdir -p "$out"
steps=${STEPS:-2000}
budget=${TRAIN_SECONDS:-240}
SECONDS=0
python3 -m fewstep.training.cli train guided --run-dir "$run" --steps "$steps" --stop-after 100 --sample-every 0
first=$SECONDS
fit=$(( 100 * budget / (first > 0 ? first : 1) ))
if [ "$fit" -lt "$steps" ]; then steps=$fit; fi
echo "first 100 steps: ${first} s; training to step $steps"
python3 -m fewstep.training.cli train guided --run-dir "$run" --steps "$steps" --sample-every 0
echo "training: ${SECONDS} s"
cp "$run/guided_student.safetensors" "$run/metrics.jsonl" "$out/"
timeout 300 python3 -m fewstep.training.cli bench --set guided --adapter "$run/guided_student.safetensors" --out-dir "$out/bench"
tar -C "$out/bench" -cf "$out/guided-grids.tar" guided-grids 2>/dev/null && rm -rf "$out/bench/guided-grids"
echo "total: ${SECONDS} s"
