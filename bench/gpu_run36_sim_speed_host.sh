#!/usr/bin/env bash
# Issue 14: bench/sim_speed.py (chunked scheduler, paged KV, the default workload's synthetic 100k turns) on one
# core of a lent machine's host CPU: this tree's simulator (B) against the session's starting point (A: commit
# 4060428's sim/, with this tree's benchmark script and synthetic spec), alternating A B A B ..., each pinned to
# the same core (taskset), --repeat 3 a call. A dedicated server core beside the shared 2-vCPU development VM,
# whose speed drifts 10% from run to run. No GPU is used.
# Carry: .whl (simpy's pure-Python wheel: the image lacks it) and .cache/speedbase (A's files), made by
#   pip download simpy --no-deps -d .whl
#   mkdir -p .cache/speedbase/bench .cache/speedbase/traces && git archive 4060428 sim | tar -x -C .cache/speedbase &&
#   cp bench/sim_speed.py .cache/speedbase/bench/ && cp traces/synth_default.yaml .cache/speedbase/traces/
# Writes $OUT/log.txt.
set -euo pipefail
: "${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
python3 -m pip install -q --no-deps --no-index .whl/simpy-*.whl 2>&1 | tail -1 || true
{ lscpu | grep -i "model name"; python3 --version; nproc; } | tee "$OUT/log.txt"
core=2
for i in 1 2 3 4 5; do
    (cd .cache/speedbase && PYTHONPATH=. taskset -c $core python3 bench/sim_speed.py --repeat 3) 2>&1 \
        | sed "s/^/A $i: /" | tee -a "$OUT/log.txt"
    PYTHONPATH=. taskset -c $core python3 bench/sim_speed.py --repeat 3 2>&1 | sed "s/^/B $i: /" | tee -a "$OUT/log.txt"
done
