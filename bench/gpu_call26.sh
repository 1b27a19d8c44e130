#!/usr/bin/env bash
# Device call 26, asked as kind nvidia-h200 (which lands on an H100 or an H200, mostly an H100): on an H200 it
# measures issue 16's H200 profile of Llama-3.1-8B (bench/gpu_run15_h200.sh); on an H100 it runs issue 15's
# next batched set (bench/gpu_run26_batched.sh). Either way the machine's time is used for what it can measure.
set -euo pipefail
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $name" | tee "$OUT/device.txt"
case "$name" in
    *H200*) bash bench/gpu_run15_h200.sh ;;
    *) bash bench/gpu_run26_batched.sh ;;
esac
