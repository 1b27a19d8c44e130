#!/usr/bin/env bash
# Next batched device call (issue 15), kind nvidia-h100-x1, ~450 s of device time: run 25's set with the top load
# raised to 8 sessions/s (run 25's 6/s gave a mean decode batch of 26-28; the issue asks >= 32 at the top), the
# replay seeded by run 25's profile, and run 25's committed profile predicting this fresh machine (the issue's
# "committed profile on a fresh machine <= 6%" target). Writes $OUT/log.txt and $OUT/run26.tgz (the run folder:
# unpack into results/gpu/run26_*/, gzip steps.csv and replay_steps.csv, write its README).
# --cpu-smoke: the same script path on CPU with the tiny model (tests nothing on the GPU).
set -euo pipefail
: "${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-smoke" ]; then
    python3 bench/gpu_batched_validate.py --out /tmp/r26 --cpu-smoke 2>&1 | tee "$OUT/log.txt" | tail -5
else
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/log.txt"
    timeout 470 python3 bench/gpu_batched_validate.py --out /tmp/r26 --attention flash_varlen --skip-attn-bench \
        --rates 0.5,2,8 --run-limit-s 25 --budget-s 370 --graph-capture-s 30 --calib-reps 5 \
        --calib-decode-batch 1,4,16,64,256 --calib-decode-ctx 128,1024,4096 --calib-chunk-new 16,256,1024,4096 \
        --calib-chunk-hist 0,2048 --calib-mixed 64x2048x32x512,512x1024x4x2048,1024x0x32x1024 \
        --replay-profile results/gpu/run25_batched_shapes_all/profile_calibrated.yaml --shape-calib-s 55 \
        --shape-calib2-s 20 --profile calibrated,run25=results/gpu/run25_batched_shapes_all/profile_calibrated.yaml \
        2>&1 | tee -a "$OUT/log.txt" | grep -v "calibration \(decode\|chunk\|mixed\)"
fi
cd /tmp/r26 && tar czf "$OUT/run26.tgz" .
