#!/usr/bin/env bash
# The next batched device call (issue 15 items 1, 3 and 5), kind nvidia-h100-x1, ~510 s of device time:
# run 26's set (bench/gpu_run26_batched.sh) with run 26's profile (shapes up to batch 96) predicting this
# fresh machine and every 100 ms of the GPU's SM clock and power logged (smi.csv: are the top load's decode
# steps 2-3% slower than their calibration because the clock is lower late in a saturated run?), plus one run whose histories come back from session files on the
# machine's local disk with DRAM bypassed (--host-runs ...,ssd: `ssd_r8_preempt`, layer-wise, on
# --preempt-blocks KV blocks like the DRAM host runs), priced by the simulator from the profile's SSD tables
# (read/write per-layer request tables and the interleaved contention model). The SSD run adds ~30-35 s
# (25 s of serving, its writes drained, its replays and comparisons), so --budget-s and the timeout grow by
# 30 s; the whole call, the CUDA tests first included, stays under 570 s.
# Writes $OUT/log.txt and $OUT/run31.tgz (the run folder: unpack into results/gpu/run31_*/, gzip steps.csv
# and replay_steps.csv, write its README).
# --cpu-smoke: the same script path on CPU with the tiny model (tests nothing on the GPU).
set -euo pipefail
: "${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-smoke" ]; then
    python3 bench/gpu_batched_validate.py --out /tmp/r31 --cpu-smoke --host-runs layerwise,load_first,ssd \
        2>&1 | tee "$OUT/log.txt" | tail -5
else
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/log.txt"
    df -h /tmp | tee -a "$OUT/log.txt"
    mkdir -p /tmp/r31
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu \
        --format=csv,nounits -lms 100 > /tmp/r31/smi.csv 2>&1 &
    smi=$!
    # the SSD tier's CUDA path against a recompute first (tiny model, ~20-30 s, at most 60; nothing if the
    # image has no pytest)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_batched_ssd.py -k cuda 2>&1 | tail -3 \
        | tee -a "$OUT/log.txt" || true
    timeout 500 python3 bench/gpu_batched_validate.py --out /tmp/r31 --attention flash_varlen --skip-attn-bench \
        --rates 0.5,2,8 --run-limit-s 25 --budget-s 400 --graph-capture-s 30 --calib-reps 5 \
        --calib-decode-batch 1,4,16,64,256 --calib-decode-ctx 128,1024,4096 --calib-chunk-new 16,256,1024,4096 \
        --calib-chunk-hist 0,2048 --calib-mixed 64x2048x32x512,512x1024x4x2048,1024x0x32x1024 \
        --replay-profile results/gpu/run26_batched_top8/profile_calibrated.yaml --shape-calib-s 55 \
        --shape-calib2-s 20 --profile calibrated,run26=results/gpu/run26_batched_top8/profile_calibrated.yaml \
        --host-runs layerwise,load_first,ssd --ssd-dir /tmp/kvsim_ssd \
        2>&1 | tee -a "$OUT/log.txt" | grep -v "calibration \(decode\|chunk\|mixed\)" \
        || echo "validation ended early: what it wrote is still packed" | tee -a "$OUT/log.txt"
    kill $smi 2>/dev/null || true
fi
cd /tmp/r31 && tar czf "$OUT/run31.tgz" .
