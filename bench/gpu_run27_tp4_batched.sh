#!/usr/bin/env bash
# Device call 27 (kind nvidia-h100-x4, ~450 s of device time with the start): the batched executor under
# tensor parallelism (gpu/tp_batched.py), Llama-3.1-70B at TP 4 with random bf16 weights drawn on the GPUs,
# validated against the simulator's chunked scheduler and cost model calibrated in the same call
# (bench/gpu_tp_batched_validate.py: syncs timed, NCCL all-reduce table, grid + replayed-shape calibration,
# recompute and hbm runs at 1 and 4 sessions/s, 22 s each, comparison). Writes $OUT/log.txt and $OUT/run27.tgz
# (the run folder: unpack into results/gpu/run27_tp4_batched/, gzip steps.csv and replay_steps.csv, write its
# README). The comparison again on CPU afterwards:
#   python bench/gpu_tp_batched_validate.py --compare results/gpu/run27_tp4_batched --out /tmp/r27cmp
# --cpu-smoke: the same script path on 2 gloo processes with a tiny GQA model (tests/test_tp_batched.py).
set -u
: "${OUT:?OUT must name the output folder}"
# NVLink multicast stays off in every process (/work/.library/device/KINDS.md); loopback for gloo, as run 13
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
    GLOO_SOCKET_IFNAME=lo PYTHONPATH=. PYTHONHASHSEED=0
mkdir -p "$OUT"
set -o pipefail
if [ "${1:-}" = "--cpu-smoke" ]; then
    rm -rf /tmp/r27smoke
    timeout 300 python3 bench/gpu_tp_batched_validate.py --cpu-smoke --out /tmp/r27smoke 2>&1 | tee "$OUT/log.txt" | tail -5
    rc=$?
    (cd /tmp/r27smoke && tar czf "$OUT/run27.tgz" .)
else
    (nvidia-smi -L; nvidia-smi topo -m) 2>&1 | tee "$OUT/log.txt"
    # the command's own timeout ends a hang (a collective: --init-timeout-s; a rank: --sync-timeout-s) with the
    # files written so far; stages and runs that would end past --budget-s are cut or skipped
    timeout 410 python3 bench/gpu_tp_batched_validate.py --out /tmp/r27 --gpus 4 --budget-s 360 2>&1 | tee -a "$OUT/log.txt" \
        | grep -v "calibration \(decode\|chunk\|mixed\)"
    rc=$?
    (cd /tmp/r27 && tar czf "$OUT/run27.tgz" .)
fi
exit $rc
