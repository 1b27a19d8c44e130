#!/usr/bin/env bash
# Issue 16's next call (kind nvidia-h100-x4, ~480 s of device time, counted in full): run 29's batched TP-4
# validation (Llama-3.1-70B, recompute and HBM prefix caching at 1 and 4 sessions/s) with the two calibration
# changes runs 31-33 found on one GPU: the serving loop's host time per step measured on a 12 s served run of
# other sessions (--host-calib-s; run 29's profile took it from a CPU replay) and each calibration sample
# followed by as much idle time (--calib-idle-ratio 1: back-to-back samples run power-capped). The SM clock and
# power of every GPU logged every 100 ms (smi.csv in the tarball). Then, on this call's files:
#   python bench/gpu_batched_table.py results/gpu/run35_*;  python bench/gpu_ttft_phase_bound.py results/gpu/run35_*
# Writes $OUT/log.txt and $OUT/run35.tgz. --cpu-smoke: the same script path with 2 gloo ranks on CPU.
set -u
: "${OUT:?OUT must name the output folder}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
    GLOO_SOCKET_IFNAME=lo PYTHONPATH=. PYTHONHASHSEED=0
mkdir -p "$OUT"
set -o pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then
    rm -rf /tmp/r35smoke
    timeout 300 python3 bench/gpu_tp_batched_validate.py --cpu-smoke --out /tmp/r35smoke --host-calib-s 2 \
        --calib-idle-ratio 1 2>&1 | tee "$OUT/log.txt" | tail -5
    rc=$?
    (cd /tmp/r35smoke && tar czf "$OUT/run35.tgz" .)
else
    (nvidia-smi -L; nvidia-smi topo -m) 2>&1 | tee "$OUT/log.txt"
    mkdir -p /tmp/r35
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu \
        --format=csv,nounits -lms 100 > /tmp/r35/smi.csv 2>&1 &
    smi=$!
    timeout 480 python3 bench/gpu_tp_batched_validate.py --out /tmp/r35 --gpus 4 --budget-s 430 --host-calib-s 12 \
        --calib-idle-ratio 1 2>&1 | tee -a "$OUT/log.txt" | grep -v "calibration \(decode\|chunk\|mixed\)"
    rc=$?
    kill $smi 2>/dev/null
    (cd /tmp/r35 && tar czf "$OUT/run35.tgz" .)
fi
exit $rc
