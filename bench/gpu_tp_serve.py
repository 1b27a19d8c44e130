"""One device call: the TP executor serves a trace slice, after measuring the TP profile it is validated
with (gpu/tp_executor.py): Llama-3.1-70B at TP 4 (bench/gpu_run17_tp4.sh), Qwen2.5-32B at TP 2
(bench/gpu_run20_tp2.sh). Its validation runs on CPU afterwards from the files it writes
(`kvsim gpu validate --gpus N --model MODEL`).

One process per GPU (torch.multiprocessing.spawn), started as bench/gpu_tp_run.py starts run 13's (the
launch path that came up on 4 H100s in 8 s, where two earlier variants hung at process-group set-up).
On CPU, `--smoke` runs the same stages on 2 gloo processes with a tiny GQA shape to check the script.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gpu.plans import PLANS  # noqa: E402
from gpu.tp_bench import NO_MULTICAST_ENV, free_port  # noqa: E402
from gpu.tp_executor import SERVED_MODELS, ServeArgs, run_rank, write_slice  # noqa: E402

STAGES = ("allreduce", "calibrate", "trace")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=250, help="wall budget of the whole run, seconds")
    ap.add_argument("--gpus", type=int, default=0, help="processes (GPUs) = TP degree; 0: every GPU, 2 with --smoke")
    ap.add_argument("--model", default="llama3.1-70b", choices=SERVED_MODELS,
                    help="the shape served (the smoke run serves a tiny one under this name)")
    ap.add_argument("--trace", default="results/gpu/trace_slice.parquet")
    ap.add_argument("--sessions", type=int, default=12, help="serve the first N sessions of the trace")
    ap.add_argument("--output-cap", type=int, default=16, help="reply tokens per turn at most (decode is not validated here)")
    ap.add_argument("--runs", default="dram_overlap,recompute", help="run names of gpu/plans.py")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--init-timeout-s", type=float, default=90,
                    help="NCCL/gloo timeout: a hang at process-group set-up or in a collective ends the run")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    a = ap.parse_args(argv)
    stages = tuple(a.stages.split(","))
    runs = tuple(a.runs.split(","))
    for flag, got, allowed in (("--stages", stages, STAGES), ("--runs", runs, [n for n in PLANS if PLANS[n].tier in ("recompute", "dram")])):
        bad = [x for x in got if x not in allowed]
        if bad:
            raise SystemExit(f"{flag}: {bad[0]!r}, expected some of {', '.join(allowed)}")
    os.environ.update(NO_MULTICAST_ENV)       # inherited by every spawned rank; each checks them again
    world = a.gpus or (2 if a.smoke or not torch.cuda.is_available() else torch.cuda.device_count())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    trace = write_slice(a.trace, a.sessions, a.output_cap, out)
    command = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items()) + " PYTHONPATH=. python3 " + \
        " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    args = ServeArgs(out=str(out), budget_s=a.budget_s, start_wall=start, trace=str(trace), runs=runs, stages=stages,
                     smoke=a.smoke, port=free_port(), init_timeout_s=a.init_timeout_s, command=command,
                     model=a.model)
    mp.spawn(run_rank, args=(world, args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
