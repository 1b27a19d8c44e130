"""One device call: what tensor parallelism costs on this host's GPUs (gpu/tp_bench.py).

Run on a multi-GPU machine (the `device` tool, kind nvidia-h100-x4):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        PYTHONPATH=. python3 bench/gpu_tp_run.py --out $OUT
One process per GPU (torch.multiprocessing.spawn), stages in the order check, allreduce, gemm, links,
layer; each writes its file into --out as it ends and is skipped when the budget left is short. On
CPU, `--smoke` runs the same stages on 2 gloo processes with tiny shapes to check the script itself.
Never imports the simulator's engine (simpy is not on the GPU image).
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

from gpu.tp_bench import NO_MULTICAST_ENV, free_port, RunArgs, run_rank  # noqa: E402

STAGES = ("check", "allreduce", "gemm", "links", "layer")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420, help="wall budget of the whole run, seconds")
    ap.add_argument("--gpus", type=int, default=0, help="processes (GPUs); 0: every GPU, 2 with --smoke")
    ap.add_argument("--tp", default="2,4", help="tensor-parallel degrees, comma-separated")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    a = ap.parse_args(argv)
    stages = tuple(a.stages.split(","))
    for st in stages:
        if st not in STAGES:
            raise SystemExit(f"--stages: {st!r}, expected some of {', '.join(STAGES)}")
    try:
        tps = tuple(int(t) for t in a.tp.split(","))
    except ValueError:
        raise SystemExit(f"--tp: {a.tp!r}, expected integers such as 2,4") from None
    # set here, inherited by every spawned rank; each rank checks them again
    os.environ.update(NO_MULTICAST_ENV)
    world = a.gpus or (2 if a.smoke or not torch.cuda.is_available() else torch.cuda.device_count())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    command = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items()) + " PYTHONPATH=. python3 " + \
        " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    args = RunArgs(out=a.out, budget_s=a.budget_s, start_wall=time.time(), stages=stages, tps=tps,
                   smoke=a.smoke, port=free_port(), command=command)
    mp.spawn(run_rank, args=(world, args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
