#!/usr/bin/env bash
# Device call 20 (kind nvidia-h100-x2): run 17 at TP 2. Qwen2.5-32B (64 layers, 40 query / 8 KV heads,
# random bf16 weights; its QKV biases are not modelled) serves the first 12 sessions of
# results/gpu/trace_slice.parquet one turn at a time (runs dram_overlap, recompute; replies capped at 16
# tokens), after measuring, in the same call, the NCCL all-reduce table at TP 2 and the TP-2 profile it is
# validated with (gpu/tp_executor.py). Llama-3.1-70B does not fit 2 x 80 GB (70.5 GB of layers a GPU
# before KV); Qwen2.5-32B holds about what a TP-4 70B rank holds (16.4 vs 17.6 GB of layers a GPU), so a
# rank's prefill and decode work is close to run 17's.
# Writes to $OUT: log.txt, env.json, allreduce.csv, allreduce_h100.yaml, profile_tp2.yaml,
# calibration_raw.json, trace_tp.parquet, trace_runs.csv (8 files: the device tool's limit).
# Validation afterwards, on CPU:
#   kvsim gpu validate --measured OUT/trace_runs.csv --trace OUT/trace_tp.parquet --profile OUT/profile_tp2.yaml \
#       --isolated none --model qwen2.5-32b --gpus 2 --out results/gpu/run20_tp2
# --cpu-smoke: the same script path on 2 gloo processes with a tiny shape (tests/test_gpu_tp_executor.py).
set -u
: "${OUT:?OUT must name the output folder}"
# NVLink multicast stays off in every process (/work/.library/device/KINDS.md); loopback for gloo, as run 13
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
    GLOO_SOCKET_IFNAME=lo PYTHONPATH=.
mkdir -p "$OUT"
set -o pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then
    timeout 400 python3 bench/gpu_tp_serve.py --smoke --gpus 2 --model qwen2.5-32b --out "$OUT" --sessions 2 \
        --output-cap 3 2>&1 | tee "$OUT/log.txt"
else
    (nvidia-smi -L; nvidia-smi topo -m) 2>&1 | tee "$OUT/log.txt"
    # the command's own timeout ends a hang (process groups, a collective: --init-timeout-s) with the files
    # written so far; stages are skipped when the budget left is short
    timeout 330 python3 bench/gpu_tp_serve.py --gpus 2 --model qwen2.5-32b --out "$OUT" --budget-s 300 \
        --init-timeout-s 90 2>&1 | tee -a "$OUT/log.txt"
fi
