#!/usr/bin/env bash
# Device call 15 (kind nvidia-h200): `kvsim gpu calibrate` for Llama-3.1-8B (GQA: 32 query heads over 8
# KV heads, head_dim 128) on one H200, the full grid (prefill 19 x 7, decode 7 x 8, heads, links, SSD,
# the serving loop's host terms). Writes to $OUT: log.txt, h200.yaml (the profile; commit it as
# configs/hardware/h200.yaml), h200.raw.json (every sample).
# --cpu-smoke: what runs without CUDA (tests/test_gpu_tp_executor.py): the command line up to its CUDA
# check, and the GQA layer grids on CPU with a tiny shape.
set -u
: "${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
set -o pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then
    python3 -m sim.cli gpu calibrate --models llama3.1-8b --out "$OUT/h200.yaml" --raw "$OUT/h200.raw.json" \
        2>&1 | tee "$OUT/log.txt"
    python3 -c "
from gpu import bench, model as M
p = bench.prefill_layer_grid(M.TINY_GQA, [16, 32], [0, 32], device='cpu')
d = bench.decode_layer_grid(M.TINY_GQA, [1, 2], [256], device='cpu')
print('gqa grids:', len(p['rows']), 'prefill points,', len(d['rows']), 'decode points')
" 2>&1 | tee -a "$OUT/log.txt"
else
    nvidia-smi 2>&1 | tee "$OUT/log.txt"
    timeout 500 python3 -m sim.cli gpu calibrate --models llama3.1-8b --out "$OUT/h200.yaml" \
        --raw "$OUT/h200.raw.json" --ssd-dir /tmp/kvsim_ssd 2>&1 | tee -a "$OUT/log.txt"
fi
