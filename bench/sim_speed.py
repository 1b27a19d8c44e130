"""Simulated turns per wall-clock second on a 100k-turn synthetic workload, one core.

    python bench/sim_speed.py [--turns 100000] [--repeat 5] [--policy attentionstore] [--scheduler prefill_first]
    python bench/sim_speed.py --bytecodes [--turns 6000] [--top 20]
    python bench/sim_speed.py --instructions [--turns 20000]

The shared machines' speed drifts by 20% between sessions and by 10% from one run to the next with
whatever else runs, so `--repeat N` runs the simulation N times in one process and prints the fastest
and the median, and two deterministic counts compare two versions of the code on any machine:
`--bytecodes` counts the Python bytecodes the run executes per turn (opcode tracing: slow, so a small
workload; C calls count as one each), and `--instructions` the CPU instructions per turn under
valgrind's cachegrind (the simulation's run less the workload's build, C work included: the closest
stand-in for time; about a minute for 20,000 turns; needs `valgrind` on the PATH).

The workload is drawn from the synthetic generator fitted to ShareGPT (sim/trace_synth.py), sized
to about --turns turns; the timing covers the simulation itself (replica + per-turn table +
summary), not building the workload.
"""
import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter

from sim.config import load_config
from sim.runner import run_simulation
from sim.workload import load_workload


def count_bytecodes(fn, by_function=None):
    """(bytecodes executed by Python frames while `fn` runs, its result); with a Counter `by_function`,
    each function's own bytecodes are counted there too, by (file, first line, name)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "opcode":
            count += 1
            if by_function is not None:
                co = frame.f_code
                by_function[(co.co_filename.rsplit("/", 1)[-1], co.co_firstlineno, co.co_name)] += 1
        return local

    def start(frame, event, arg):
        frame.f_trace_opcodes = True
        return local

    sys.settrace(start)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return count, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=100_000)
    ap.add_argument("--policy", default="attentionstore")
    ap.add_argument("--scheduler", default="chunked", choices=("prefill_first", "chunked"),
                    help="scheduler.kind (chunked: the default engine)")
    ap.add_argument("--rate", type=float, default=0.04,
                    help="session arrivals per second (one A100 sustains about 0.045 on ShareGPT lengths)")
    ap.add_argument("--bytecodes", action="store_true",
                    help="count Python bytecodes per turn instead of timing (deterministic; use --turns 6000)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="with --bytecodes: the N functions executing the most bytecodes, a turn each")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="time the simulation N times (>= 1) and print the fastest and the median")
    ap.add_argument("--instructions", action="store_true",
                    help="count CPU instructions per turn under valgrind (deterministic; use --turns 20000)")
    ap.add_argument("--phase", choices=("build", "run"), help=argparse.SUPPRESS)  # --instructions' children
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat: expected a count >= 1, got {args.repeat}")
    if args.instructions:
        return count_instructions(args)
    from sim import trace_synth
    spec = trace_synth.SynthSpec.default()
    mean_turns = max(spec.mean_turns() if hasattr(spec, "mean_turns") else 4.0, 1.0)
    n_sessions = int(args.turns / mean_turns)
    cfg = load_config({"model": "llama2-13b", "workload": {"synthetic": {"n_sessions": n_sessions},
                                                           "session_rate_per_s": args.rate},
                       "policy": {"kind": args.policy}, "scheduler": {"kind": args.scheduler}})
    t0 = time.perf_counter()
    wl = load_workload(cfg)
    built = time.perf_counter() - t0
    if args.phase:  # a child of --instructions: build the workload, and with "run" simulate it once
        if args.phase == "run":
            print(f"turns {run_simulation(cfg, wl).summary['turns']}")
        return
    if args.bytecodes:
        funcs = Counter() if args.top else None
        count, res = count_bytecodes(lambda: run_simulation(cfg, wl), funcs)
        n = res.summary["turns"]
        print(f"policy {args.policy}, scheduler {args.scheduler}: {n} turns, {count:,} Python bytecodes "
              f"-> {count / n:,.0f} a turn")
        for (file, line, name), c in (funcs.most_common(args.top) if funcs else ()):
            print(f"{c / n:8.1f}  {file}:{line} {name}")
        return
    cpu = []
    for _ in range(args.repeat):
        t1 = time.perf_counter()
        c1 = time.process_time()
        res = run_simulation(cfg, wl)
        c2 = time.process_time()
        t2 = time.perf_counter()
        cpu.append(c2 - c1)
    n = res.summary["turns"]
    print(f"workload: {n} turns in {n_sessions} sessions at {args.rate} sessions/s (built in {built:.2f} s)")
    # CPU time is the figure: wall time also counts whatever else shares the core
    print(f"policy {args.policy}, scheduler {args.scheduler}: simulated {n} turns in {c2 - c1:.2f} s CPU ({t2 - t1:.2f} s wall) "
          f"-> {n / (c2 - c1):,.0f} turns/s")
    if args.repeat > 1:
        print(f"{args.repeat} runs: fastest {n / min(cpu):,.0f} turns/s, median {n / statistics.median(cpu):,.0f} turns/s")
    print(f"simulated time {res.summary['makespan_s']:.0f} s, TTFT mean {res.summary['ttft_mean_s']:.3f} s, "
          f"p99 {res.summary['ttft_p99_s']:.3f} s")


def count_instructions(args) -> None:
    """CPU instructions a simulated turn under cachegrind: one child builds the workload only, one also
    runs it; the difference over the turns."""
    if shutil.which("valgrind") is None:
        sys.exit("sim_speed.py: --instructions needs valgrind on the PATH (Debian: apt-get install valgrind)")
    counts, turns = {}, None
    for phase in ("build", "run"):
        # deterministic: one BLAS thread (its idle threads spin, and valgrind counts every thread), fixed
        # string hashes, and fixed addresses (setarch -R) for the objects hashed by identity
        cmd = (["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []) + ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, __file__, "--phase", phase, "--turns", str(args.turns), "--policy", args.policy,
               "--scheduler", args.scheduler, "--rate", str(args.rate)]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if out.returncode or refs is None:
            sys.exit(f"sim_speed.py: valgrind's {phase} run failed (exit {out.returncode}): "
                     f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'}")
        counts[phase] = int(refs.group(1).replace(",", ""))
        if phase == "run":
            turns = int(re.search(r"^turns (\d+)", out.stdout, re.M).group(1))
    print(f"policy {args.policy}, scheduler {args.scheduler}: {turns} turns, "
          f"{counts['run'] - counts['build']:,} CPU instructions -> {(counts['run'] - counts['build']) / turns:,.0f} a turn")


if __name__ == "__main__":
    main()
