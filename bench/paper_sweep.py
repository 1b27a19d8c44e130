"""Wall time of the whole CachedAttention reproduction sweep, from scratch, and its headline numbers.

    python bench/paper_sweep.py [--jobs 2] [--out DIR] [--ray ADDRESS]

Runs every spec in configs/paper/sweeps into a fresh folder (a temporary one unless --out), then
prints each part's wall time, the total, and kvsim's best gains next to the paper's claims.
`kvsim sweep configs/paper/sweeps && kvsim report results/paper` is the everyday way; this script
exists to time a cold run.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sim.report import CLAIMS, best_gains, load_parts
from sim.sweep import load_sweep_spec, run_sweep

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, help="results root (default: a fresh temporary folder)")
    ap.add_argument("--ray", help="Ray address instead of local processes")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kvsim-paper-"))
    specs = [load_sweep_spec(p) for p in sorted((ROOT / "configs/paper/sweeps").glob("*.yaml"))]
    print(f"{len(specs)} sweeps, {os.cpu_count()} CPU cores, --jobs {args.jobs}, into {out}")
    t0 = time.perf_counter()
    points = 0
    for spec in specs:
        part = out / spec.name.split("/", 1)[1]
        res = run_sweep(spec, out_dir=part, jobs=args.jobs, ray_address=args.ray, force=True, progress=False)
        points += res.total
        print(f"  {spec.name:<16} {res.total:3d} points  {res.failed} failed  {res.wall_s:6.1f} s")
    total = time.perf_counter() - t0
    print(f"total: {points} points in {total:.1f} s wall")
    parts = load_parts(out)
    for c, (val, where) in zip(CLAIMS, best_gains(parts)):
        print(f"  {c.what:<38} paper {c.paper:<12} kvsim best {c.fmt(val):>7}  ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
