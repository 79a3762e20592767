#!/usr/bin/env bash
# The Flash checks that need a CUDA GPU, in one go (a few minutes on an H100). Results go to ${OUT:-bench/results}.
#   1. SD1.5-size UNet (random weights), 512 px, paper preset, batch 4, bf16: steps/s and peak memory,
#      teacher work once (fewstep) vs twice (reference structure); then the same with gradient checkpointing.
#   2. `fewstep train flash` on the bundled teacher on CUDA in bf16: stop half-way, resume, export.
set -u
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 200 python3 bench/flash_throughput.py --model sd15-random --batch-size 4 --mixed-precision bf16 \
    --out "$out/flash_throughput_sd15_bf16.json"
timeout 200 python3 bench/flash_throughput.py --model sd15-random --batch-size 4 --mixed-precision bf16 \
    --gradient-checkpointing --out "$out/flash_throughput_sd15_bf16_gc.json"
run=$(mktemp -d)
common=(train flash --run-dir "$run" --phase-steps 25,25,25,25 --checkpoint-every 25 --sample-every 50 --mixed-precision bf16)
SECONDS=0
timeout 150 python3 -m fewstep.training.cli "${common[@]}" --stop-after 50
timeout 150 python3 -m fewstep.training.cli "${common[@]}"
echo "train flash, 100 proxy steps in two runs: ${SECONDS} s"
cut -c1-300 "$run/metrics.jsonl" | sed -n '1p;$p'
python3 -m fewstep.training.cli inspect "$run/flash_lora.safetensors" | head -12
cp "$run/metrics.jsonl" "$out/flash_cuda_metrics.jsonl"
