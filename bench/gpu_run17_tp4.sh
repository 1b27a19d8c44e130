#!/usr/bin/env bash
# Device call 17 (kind nvidia-h100-x4): run 14 again with the calibration timing what the executor pays
# (decode: 16 whole steps of the served 80-layer model back to back a sample; prefill: a sample of as many
# layer-graph launches as a served prefill). Llama-3.1-70B at TP 4 serves the first 12 sessions of
# results/gpu/trace_slice.parquet one turn at a time (runs dram_overlap, recompute; replies capped at
# 16 tokens), after measuring the TP-4 profile it is validated with (gpu/tp_executor.py).
# Writes to $OUT: log.txt and run.tgz (env.json, profile_tp4.yaml, calibration_raw.json, trace_tp.parquet,
# trace_runs.csv, allreduce.csv, allreduce_h100.yaml, smi.csv: the GPUs' clocks and power every 100 ms).
# Validation afterwards, on CPU:
#   kvsim gpu validate --measured OUT/trace_runs.csv --trace OUT/trace_tp.parquet --profile OUT/profile_tp4.yaml \
#       --isolated none --model llama3.1-70b --gpus 4 --out results/gpu/run17_tp4
# --cpu-smoke: the same script path on 2 gloo processes with a tiny shape (tests/test_gpu_tp_executor.py).
set -u
: "${OUT:?OUT must name the output folder}"
# NVLink multicast stays off in every process (/work/.library/device/KINDS.md); loopback for gloo, as run 13
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
    GLOO_SOCKET_IFNAME=lo PYTHONPATH=.
mkdir -p "$OUT"
set -o pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then
    timeout 400 python3 bench/gpu_tp_serve.py --smoke --out "$OUT" --sessions 2 --output-cap 3 2>&1 | tee "$OUT/log.txt"
else
    (nvidia-smi -L; nvidia-smi topo -m) 2>&1 | tee "$OUT/log.txt"
    # every GPU's SM clock, power and temperature every 100 ms beside the run (another process: the ranks pay
    # nothing), to see whether a decode right after a long prefill runs at a lower clock
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu \
        --format=csv,nounits -lms 100 > "$OUT/smi.csv" 2>&1 &
    smi=$!
    # the command's own timeout ends a hang (process groups, a collective: --init-timeout-s) with the files
    # written so far; stages are skipped when the budget left is short
    timeout 360 python3 bench/gpu_tp_serve.py --out "$OUT" --budget-s 330 --init-timeout-s 90 2>&1 | tee -a "$OUT/log.txt"
    rc=$?
    kill $smi 2>/dev/null
    # the device tool returns at most 8 files: everything but the log in one archive
    (cd "$OUT" && tar czf run.tgz --remove-files $(ls | grep -v -x -e log.txt -e run.tgz))
    exit $rc
fi
