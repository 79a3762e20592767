#!/usr/bin/env bash
# SnapFusion's block latency table for a real-size SD1.5 UNet (random weights: timing only) at 512 px on a CUDA GPU,
# in float16 (how the UIs run SD) and float32: `fewstep snap plan --latency-only`. A minute or two on an H100.
# Results go to ${OUT:-bench/results}; REPEATS (default 20) timed passes per configuration.
set -eu
out=${OUT:-bench/results}
teacher=$(mktemp -d)/sd15-random
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
(cd bench && python3 -c "import sys; from flash_throughput import sd15_random_pipeline; sd15_random_pipeline().save_pretrained(sys.argv[1])" "$teacher")
for dtype in float16 float32; do
    timeout 300 python3 -m fewstep.training.cli snap plan --teacher "$teacher" --latency-only --dtype "$dtype" \
        --repeats "${REPEATS:-20}" --out "$out/snapfusion_blocks_sd15_$dtype.json"
done
