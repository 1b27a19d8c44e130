"""Peak resident memory of one run of about --turns turns on the synthetic workload, results written.

    python bench/sim_memory.py [--turns 1000000] [--policy attentionstore] [--rate 0.04] [--scheduler chunked]

Builds the workload, simulates it and writes its result files (turns.parquet streamed in row groups)
into a temporary folder, then prints the process's peak RSS (`resource.getrusage`, everything the
process ever held: Python, numpy, the trace while it was built), the resident memory after each
stage, and what the per-turn Python lists a run holds cost a turn (sampled: each list's slot plus the
objects only it refers to).
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim import trace_synth  # noqa: E402
from sim.config import load_config  # noqa: E402
from sim.runner import write_results  # noqa: E402
from sim.units import GB  # noqa: E402
from sim.workload import load_workload  # noqa: E402

SMALL_INTS = range(-5, 257)  # CPython shares these: a list of them holds only pointers


def rss_bytes() -> float:
    """Resident memory now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def per_item_bytes(seq, seen: set, sample: int = 100_000) -> float:
    """Bytes per element of a list: its pointer slot plus the objects of a leading sample, counting an
    object once however many slots (of this list or of lists weighed before, `seen`) share it; a small
    int or None costs only the slot."""
    if not isinstance(seq, list) or not seq:
        return float(getattr(seq, "itemsize", 8))
    head = seq[:sample]
    total = 0
    for x in head:
        if x is None or (type(x) is int and x in SMALL_INTS) or id(x) in seen:
            continue
        seen.add(id(x))
        total += sys.getsizeof(x)
    return 8.0 + total / len(head)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=1_000_000)
    ap.add_argument("--policy", default="attentionstore")
    ap.add_argument("--rate", type=float, default=0.04, help="session arrivals per second")
    ap.add_argument("--scheduler", default="chunked", choices=("prefill_first", "chunked"), help="scheduler.kind")
    args = ap.parse_args()
    spec = trace_synth.SynthSpec.default()
    n_sessions = max(int(args.turns / spec.mean_turns()), 1)
    cfg = load_config({"model": "llama2-13b", "workload": {"synthetic": {"n_sessions": n_sessions},
                                                           "session_rate_per_s": args.rate},
                       "policy": {"kind": args.policy}, "scheduler": {"kind": args.scheduler}})
    stages = [("start", rss_bytes(), peak_rss_bytes())]
    t0 = time.perf_counter()
    wl = load_workload(cfg)
    stages.append(("workload built", rss_bytes(), peak_rss_bytes()))
    t1 = time.perf_counter()

    # the run of sim.runner.run_simulation, kept open to weigh the replica's per-turn lists afterwards
    import simpy

    from sim.costmodel import build_cost_model
    from sim.engine import ChunkedReplica, Replica
    from sim.metrics import TurnRows, summarize
    from sim.runner import SimResult
    from sim.workload import Users

    env = simpy.Environment()
    replica = (ChunkedReplica if args.scheduler == "chunked" else Replica)(env, cfg, build_cost_model(cfg), wl)
    turns = replica.turns if args.scheduler == "chunked" else replica.sched  # who turns turns into jobs
    users = Users(env, wl, replica)
    replica.attach(users)
    env.run(until=users.all_done)
    rows = TurnRows(replica.rec, wl)
    res = SimResult(cfg, rows, summarize(rows, replica, cfg), replica.rec.hbm.table())
    t2 = time.perf_counter()
    stages.append(("simulated", rss_bytes(), peak_rss_bytes()))
    rec = replica.rec
    lists = {
        "workload.session (str per turn)": wl.session,
        "workload.prefix_hashes": wl.prefix_hashes,
        "workload numpy arrays (6 x 8 B)": None,
        "users.arrival_s": users.arrival_s,
        "users.think_s": users.think_s,
        "users.next_turn": users.next_turn,
        "scheduler.w_session (shares the strs)": turns.w_session,
        "scheduler.w_prompt": turns.w_prompt,
        "scheduler.w_output": turns.w_output,
        "recorder columns": None,
    }
    weights, seen = [], set()
    for name, seq in lists.items():
        if name.startswith("workload numpy"):
            b = float(sum(getattr(wl, k).itemsize for k in ("turn", "arrival_s", "think_s", "prompt_tokens",
                                                            "output_tokens", "next_turn")))
        elif name == "recorder columns":
            b = float(sum(getattr(rec, c).itemsize for c in rec.COLS + rec.INT_COLS)
                      + sum(getattr(rec, c).itemsize for c in ("hit_tier", "truncated", "clipped_tokens",
                                                               "preemptions")))
        else:
            b = per_item_bytes(seq, seen)
        weights.append(f"  {name:38s} {b:6.1f} B  {b * 10e6 / GB:6.2f} GB")
    per_session = sys.getsizeof(turns.session_context) / max(len(turns.session_context), 1)
    weights.append(f"  scheduler.session_context (per session, dict slots only) {per_session:.0f} B "
                   f"x {len(turns.session_context):,} sessions")
    del replica, users, env, rec, turns  # as after run_simulation returns: only the result is left
    with tempfile.TemporaryDirectory() as tmp:
        write_results(res, tmp)
        size = (Path(tmp) / "turns.parquet").stat().st_size
    t3 = time.perf_counter()
    stages.append(("results written", rss_bytes(), peak_rss_bytes()))
    n = len(wl)
    peak = peak_rss_bytes()
    print(f"{n:,} turns in {n_sessions:,} sessions ({args.policy}, {args.scheduler}, {args.rate} sessions/s): workload "
          f"{t1 - t0:.1f} s, simulation {t2 - t1:.1f} s ({n / (t2 - t1):,.0f} turns/s), writing "
          f"{t3 - t2:.1f} s (turns.parquet {size / GB:.3f} GB)")
    print(f"peak RSS {peak / GB:.3f} GB = {peak / n:,.0f} bytes per turn")
    for name, b, p in stages:
        print(f"  {name:16s} RSS {b / GB:7.3f} GB, peak so far {p / GB:7.3f} GB")
    print("per-turn storage held during the run (bytes per turn; x 10M turns):")
    print("\n".join(weights))


if __name__ == "__main__":
    main()
