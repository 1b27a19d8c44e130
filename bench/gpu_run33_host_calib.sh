#!/usr/bin/env bash
# Issue 15: the serving loop's host time per step measured as served (`--host-calib-s 15`: a 15 s run on other
# sessions, --seed 1, at the top rate, before the validation runs; `gpu.calibrate.host_step_from_served`) instead
# of the CPU replay's 3-4x smaller figure (runs 31-32), and run 31's profile (replay host time) predicting this
# fresh machine. Kind nvidia-h100-x1, ~480 s of device time. Llama-3.1-8B, run 31's set without the SSD run.
# Writes $OUT/log.txt and $OUT/run33.tgz (unpack into results/gpu/run33_*/).
# --cpu-smoke: the same script path on CPU with the tiny model (tests nothing on the GPU).
set -euo pipefail
: "${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-smoke" ]; then
    python3 bench/gpu_batched_validate.py --out /tmp/r33 --cpu-smoke --host-calib-s 5 2>&1 | tee "$OUT/log.txt" | tail -5
else
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/log.txt"
    mkdir -p /tmp/r33
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu \
        --format=csv,nounits -lms 100 > /tmp/r33/smi.csv 2>&1 &
    smi=$!
    timeout 500 python3 bench/gpu_batched_validate.py --out /tmp/r33 --attention flash_varlen --skip-attn-bench \
        --rates 0.5,2,8 --run-limit-s 25 --budget-s 405 --graph-capture-s 30 --calib-reps 5 \
        --calib-decode-batch 1,4,16,64,256 --calib-decode-ctx 128,1024,4096 --calib-chunk-new 16,256,1024,4096 \
        --calib-chunk-hist 0,2048 --calib-mixed 64x2048x32x512,512x1024x4x2048,1024x0x32x1024 \
        --replay-profile results/gpu/run31_batched_ssd_fresh/profile_calibrated.yaml --shape-calib-s 55 \
        --shape-calib2-s 20 --host-calib-s 15 \
        --profile calibrated,run31=results/gpu/run31_batched_ssd_fresh/profile_calibrated.yaml \
        2>&1 | tee -a "$OUT/log.txt" | grep -v "calibration \(decode\|chunk\|mixed\)" \
        || echo "validation ended early: what it wrote is still packed" | tee -a "$OUT/log.txt"
    kill $smi 2>/dev/null || true
fi
cd /tmp/r33 && tar czf "$OUT/run33.tgz" .
