"""Simulated turns per wall-clock second on a 100k-turn synthetic workload, one core.

    python bench/sim_speed.py [--turns 100000] [--policy attentionstore] [--scheduler prefill_first]
    python bench/sim_speed.py --bytecodes [--turns 6000] [--top 20]

The shared machines' speed drifts by 20% between sessions and with whatever else runs, so
`--bytecodes` also counts the Python bytecodes the run executes per turn (opcode tracing: slow, so a
small workload): the same figure on any machine, for comparing two versions of the code. It counts
Python-level work only (C calls count as one instruction each).

The workload is drawn from the synthetic generator fitted to ShareGPT (sim/trace_synth.py), sized
to about --turns turns; the timing covers the simulation itself (replica + per-turn table +
summary), not building the workload.
"""
import argparse
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
    args = ap.parse_args()
    from sim import trace_synth
    spec = trace_synth.SynthSpec.default()
    mean_turns = max(spec.mean_turns() if hasattr(spec, "mean_turns") else 4.0, 1.0)
    n_sessions = int(args.turns / mean_turns)
    cfg = load_config({"model": "llama2-13b", "workload": {"synthetic": {"n_sessions": n_sessions},
                                                           "session_rate_per_s": args.rate},
                       "policy": {"kind": args.policy}, "scheduler": {"kind": args.scheduler}})
    t0 = time.perf_counter()
    wl = load_workload(cfg)
    t1 = time.perf_counter()
    if args.bytecodes:
        funcs = Counter() if args.top else None
        count, res = count_bytecodes(lambda: run_simulation(cfg, wl), funcs)
        n = res.summary["turns"]
        print(f"policy {args.policy}, scheduler {args.scheduler}: {n} turns, {count:,} Python bytecodes "
              f"-> {count / n:,.0f} a turn")
        for (file, line, name), c in (funcs.most_common(args.top) if funcs else ()):
            print(f"{c / n:8.1f}  {file}:{line} {name}")
        return
    c1 = time.process_time()
    res = run_simulation(cfg, wl)
    c2 = time.process_time()
    t2 = time.perf_counter()
    n = res.summary["turns"]
    print(f"workload: {n} turns in {n_sessions} sessions at {args.rate} sessions/s (built in {t1 - t0:.2f} s)")
    # CPU time is the figure: wall time also counts whatever else shares the core
    print(f"policy {args.policy}, scheduler {args.scheduler}: simulated {n} turns in {c2 - c1:.2f} s CPU ({t2 - t1:.2f} s wall) "
          f"-> {n / (c2 - c1):,.0f} turns/s")
    print(f"simulated time {res.summary['makespan_s']:.0f} s, TTFT mean {res.summary['ttft_mean_s']:.3f} s, "
          f"p99 {res.summary['ttft_p99_s']:.3f} s")


if __name__ == "__main__":
    main()
