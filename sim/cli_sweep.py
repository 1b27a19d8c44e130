"""`kvsim sweep`, `kvsim plot`, `kvsim report` and `kvsim plan`: registered on the lead's `kvsim` parser."""
from __future__ import annotations

import os
from pathlib import Path

from sim import argtypes as at
from sim.config import GpuConfig, HostConfig, SsdConfig, WorkloadConfig
from sim.errors import KvsimError
from sim.plan import MAX_REPLICATIONS
from sim.units import GB, TB

# The planner's sizes take the config fields' bounds; a DRAM step must be at least a byte (a ladder of
# 0-byte steps never ends; sim.plan.capacity_ladder bounds how many sizes a step makes).
DRAM_SIZE = at.from_knob(HostConfig, "dram_bytes")
DRAM_STEP = at.from_knob(HostConfig, "dram_bytes", lo=1.0)
SSD_SIZE = at.from_knob(SsdConfig, "bytes")
# Every SSD size x GPU count bisects DRAM over several seeds: 64 of either is already a day of runs.
MAX_SSD_SIZES = 64
MAX_GPU_COUNTS = 64
GPU_COUNTS = at.listed(at.from_knob(GpuConfig, "count"), MAX_GPU_COUNTS, "1,2,4")
SSD_SIZES = at.listed(SSD_SIZE, MAX_SSD_SIZES, "0,2TB,8TB")
REPLICATIONS = at.bounded_int(1, MAX_REPLICATIONS, "the 95% bound narrows little beyond 100 runs")
# Fields the planner sets on every candidate: an override of them would be silently replaced.
PLANNER_OWNS = {"host.dram_bytes": "--dram-min/--dram-max/--dram-step", "ssd.bytes": "--ssd/--ssd-max"}


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a YAML sweep spec (grid/zip/variants x seeds), resumable",
                              description="Run every point of one or more sweep specs (configs/sweeps/README.md); "
                                          "finished points are skipped, failing points are recorded.")
    p.add_argument("specs", nargs="+", type=Path, help="sweep spec YAML file(s), or folders of them")
    p.add_argument("--out", type=Path, help="output directory (default results/<name>; only with one spec)")
    p.add_argument("--jobs", "-j", type=at.jobs(), default=None, help="worker processes (default: all CPU cores)")
    p.add_argument("--ray", metavar="ADDRESS", type=at.non_empty("a Ray address"),
                   help="run points as Ray tasks on this cluster ('auto', 'ray://host:10001', or 'local' for a "
                        "local instance)")
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed")
    p.add_argument("--force", action="store_true", help="rerun every point, finished or not")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", action="store_true", help="draw the figures when the sweep is done")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("plot", help="draw the figures of a sweep (PNG + PDF) from its result files")
    p.add_argument("results", type=Path, help="a sweep directory (with points.parquet) or a folder of them")
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser("report", help="write results/paper/REPORT.md: reproduced numbers vs CachedAttention")
    p.add_argument("results", type=Path, nargs="?", default=Path("results/paper"),
                   help="the paper results folder (default results/paper)")
    p.add_argument("--no-plot", action="store_true", help="reuse figures already drawn")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("plan", help="cheapest DRAM/SSD (and GPU count) meeting an SLO, by bisection",
                              description="Search DRAM by bisection for each SSD size on a ladder (and each GPU "
                                          "count); each candidate runs over several seeds and is feasible when the "
                                          "one-sided 95%% confidence bound on its mean meets the SLO; the answer is "
                                          "the cheapest feasible candidate evaluated (sim/plan.py).")
    p.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="base config YAML")
    p.add_argument("--slo", required=True, type=at.non_empty("METRIC<=VALUE"),
                   help='e.g. "ttft_p99_ms<=500" (any summary metric; _ms reads _s keys)')
    p.add_argument("--rate", type=at.from_knob(WorkloadConfig, "session_rate_per_s"),
                   help="session arrival rate (sessions/s) to plan for")
    p.add_argument("--gpus", type=GPU_COUNTS, default=None,
                   help="GPU counts to consider, e.g. 1,2,4 (default: the config's)")
    p.add_argument("--dram-min", type=DRAM_SIZE, default=0.0, help="least DRAM per replica to consider (default 0)")
    p.add_argument("--dram-max", type=DRAM_SIZE, default=1 * TB, help="most DRAM per replica to consider (default 1TB)")
    p.add_argument("--dram-step", type=DRAM_STEP, default=16 * GB, help="DRAM granularity of the answer (default 16GB)")
    p.add_argument("--ssd", type=SSD_SIZES, default=None,
                   help="SSD sizes to try, e.g. 0,2TB,8TB (default: 0 and --ssd-max/16, /4, /1)")
    p.add_argument("--ssd-max", type=SSD_SIZE, default=16 * TB,
                   help="largest SSD size of the default ladder (default 16TB)")
    p.add_argument("--cost", default="provisioned_usd_per_hour",
                   help="what to minimise: provisioned_usd_per_hour (sim/pricing.py: GPUs, plus DRAM + SSD when the "
                        "policy keeps a store, at the config's prices; the default) or any summary metric, averaged "
                        "over the runs, e.g. cost_per_1k_turns_usd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--replications", "-r", type=REPLICATIONS, default=5,
                   help="runs per candidate, seeds redrawing the config's random draws (default 5; 1 where the "
                        "seed redraws nothing)")
    p.add_argument("--jobs", "-j", type=at.jobs(), default=None, help="simulations at once (default: all CPU cores)")
    p.add_argument("--out", type=Path, help="also write plan.csv (every candidate) and plan.png/.pdf here")
    p.set_defaults(func=cmd_plan)


# ---------------------------------------------------------------- sweep / plot / report

def cmd_sweep(args) -> int:
    from sim.sweep import default_out_dir, load_sweep_spec, prepare_out_dir, resolve_points, run_sweep

    paths = []
    for s in args.specs:  # a folder stands for its *.yaml specs, in name order
        paths += sorted(s.glob("*.yaml")) if s.is_dir() else [s]
    if not paths:
        raise KvsimError(f"{args.specs[0]}: no *.yaml sweep specs in this folder")
    specs = [load_sweep_spec(s) for s in paths]  # all specs validated before anything runs
    if args.out and len(specs) > 1:
        raise KvsimError("--out: expected a single spec when --out is given")
    for spec in specs:  # every point of every spec, and every output folder, before the first point runs
        resolve_points(spec)
        prepare_out_dir(args.out or default_out_dir(spec),
                        "--out" if args.out else f"{spec.path}: {'out' if spec.out else 'name'} (output folder)")
    any_failed = False
    for spec in specs:
        res = run_sweep(spec, out_dir=args.out, jobs=args.jobs, ray_address=args.ray,
                        retry_failed=args.retry_failed, force=args.force, progress=not args.no_progress)
        print(f"sweep {spec.name}: {res.total} points, ran {res.ran}, skipped {res.skipped} finished, "
              f"{res.failed} failed, {res.wall_s:.1f} s -> {res.out_dir / 'points.parquet'}")
        failed = res.table[res.table["status"] == "error"]
        for _, row in failed.head(5).iterrows():
            print(f"  point {row['point']} ({row['key']}) failed: {row['error']}")
        if len(failed) > 5:
            print(f"  ... and {len(failed) - 5} more (see the error column of points.parquet)")
        any_failed |= len(failed) > 0
        if args.plot:
            from sim.plot import plot_sweep

            for path in plot_sweep(res.out_dir):
                print(f"  wrote {path}")
    return 1 if any_failed else 0


def cmd_plot(args) -> int:
    from sim.plot import plot_sweep, sweep_dirs
    from sim.sweep import prepare_out_dir

    for d in sweep_dirs(args.results):  # every figure folder checked before the first figure is drawn
        prepare_out_dir(d / "plots", "kvsim plot:")

    paths = plot_sweep(args.results)
    if not paths:  # bad input, as a folder of no sweep is: one line on stderr, exit 2
        raise KvsimError(f"{args.results}: no successful points to plot; expected a sweep with at least one "
                         f"point of status ok")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from sim.report import write_report

    path = write_report(args.results, draw=not args.no_plot)  # checks its folders before writing
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- plan

def _overrides(items: list[str]) -> dict:
    from sim.config import parse_overrides

    return parse_overrides(items, example="policy.eviction=lru")


def cmd_plan(args) -> int:
    import re

    from sim.config import load_config
    from sim.plan import (PROVISIONED, SimulatorEvaluator, capacity_ladder, format_plan, parse_slo,
                          plan_capacity, write_plan)
    from sim.sweep import prepare_out_dir

    slo = parse_slo(args.slo)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.cost or ""):
        raise KvsimError(f"--cost {args.cost!r}: expected {PROVISIONED} or a summary metric name, "
                         f"e.g. cost_per_1k_turns_usd")
    overrides = _overrides(args.set)
    for key, flags in PLANNER_OWNS.items():
        section, field = key.split(".")
        if key in overrides or field in (overrides.get(section) if isinstance(overrides.get(section), dict) else ()):
            raise KvsimError(f"--set {key}: the planner chooses it (searched over {flags}); expected no override")
    if args.rate is not None:
        overrides["workload.session_rate_per_s"] = args.rate
    base = load_config(args.config, overrides)  # validates the config and the overrides up front
    gpus = args.gpus if args.gpus is not None else [base.gpu.count]
    dram = capacity_ladder(args.dram_min, args.dram_max, args.dram_step)
    ssd = args.ssd if args.ssd is not None else [0.0, args.ssd_max / 16, args.ssd_max / 4, args.ssd_max]
    if args.out:
        prepare_out_dir(args.out, "--out")  # before the first simulation, not after the last
    jobs = max(1, args.jobs or os.cpu_count() or 1)
    evaluate = SimulatorEvaluator(args.config, overrides, slo, args.cost, jobs=jobs, replications=args.replications)
    try:
        # a batch of `jobs` simulations: as many candidates as fill it with their replications
        plan = plan_capacity(evaluate, slo, gpus, ssd, dram, width=max(1, jobs // len(evaluate.seeds)),
                             method=evaluate.method)
    finally:
        evaluate.close()
    print(f"plan for {args.config} with {overrides or 'no overrides'}")
    print(format_plan(plan, args.cost))
    if args.out:
        for path in write_plan(plan, args.cost, args.out):
            print(f"wrote {path}")
    return 0 if plan.best is not None else 1
