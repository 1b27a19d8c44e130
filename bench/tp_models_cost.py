"""Planner comparison (issue 16): cost per 1,000 turns at an SLO for each deployment of a sweep.

    python -m sim.cli sweep configs/sweeps/tp_models.yaml          # -> results/tp_models
    python bench/tp_models_cost.py results/tp_models [--ttft-p99-s 2] [--tpot-p99-s 0.2]

For each variant (deployment) of the sweep: every session rate with TTFT p99, TPOT p99, whether the SLO
holds, and the cost per 1,000 turns: `cost_per_1k_turns_usd` (the replica's hourly rate over its
GPU-busy hours: what the work costs where the fleet is kept busy) and the provisioned cost over the
makespan (idle think time included: the trace's sessions last ~1.8 h whatever the rate). Then the
highest rate that meets the SLO, per variant, and its cost per 1,000 turns. The SLO defaults are
MLPerf's Llama-2-70B server bounds as the summary's goodput uses them (TTFT 2 s, TPOT 0.2 s), applied
here to the p99.
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd

RATE = "workload.session_rate_per_s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="the sweep's output directory (with points.parquet)")
    ap.add_argument("--ttft-p99-s", type=float, default=2.0)
    ap.add_argument("--tpot-p99-s", type=float, default=0.2)
    args = ap.parse_args()
    pts = pd.read_parquet(args.results / "points.parquet")
    bad = pts[pts.status != "ok"]
    if len(bad):
        sys.exit(f"{args.results}: {len(bad)} points failed: {bad.error.iloc[0]}")
    spec = json.loads((args.results / "sweep.json").read_text()).get("description", "")
    print(spec.strip(), "\n")
    pts = pts.assign(slo=(pts.ttft_p99_s <= args.ttft_p99_s) & (pts.tpot_p99_s <= args.tpot_p99_s),
                     provisioned_per_1k=1000.0 * pts.provisioned_cost_usd / pts.turns)
    cols = ["variant", "gpu.count", RATE, "turns", "ttft_p99_s", "tpot_p99_s", "slo", "cost_per_1k_turns_usd",
            "provisioned_per_1k", "hit_rate_dram", "miss_rate"]
    print(pts[cols].round(4).to_string(index=False), "\n")
    print(f"SLO: TTFT p99 <= {args.ttft_p99_s} s and TPOT p99 <= {args.tpot_p99_s} s\n")
    print("| deployment | GPUs | highest session rate meeting the SLO (/s) | TTFT p99 s | TPOT p99 s | "
          "USD per 1,000 turns (GPU-busy) | USD per 1,000 turns (provisioned) |")
    print("|---|---|---|---|---|---|---|")
    for v, g in pts.groupby("variant", sort=False):
        ok = g[g.slo]
        if ok.empty:
            print(f"| {v} | {int(g['gpu.count'].iloc[0])} | none of {sorted(g[RATE])} | | | | |")
            continue
        r = ok.loc[ok[RATE].idxmax()]
        print(f"| {v} | {int(r['gpu.count'])} | {r[RATE]:g} | {r.ttft_p99_s:.3f} | {r.tpot_p99_s:.4f} | "
              f"{r.cost_per_1k_turns_usd:.2f} | {r.provisioned_per_1k:.2f} |")


if __name__ == "__main__":
    main()
