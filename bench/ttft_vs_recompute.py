"""AttentionStore vs recompute (and HBM-only prefix caching) on ShareGPT, LLaMA-2-13B, one A100-80GB.

    python bench/ttft_vs_recompute.py [--config configs/default.yaml] [--set KEY=VALUE ...]

Prints mean / p99 TTFT and prefill throughput per policy and the changes beside the CachedAttention
paper's headline claims (TTFT up to -87%, prefill throughput up to 7.8x, cost up to -70%).
The paper's numbers are maxima over its models and settings; this is one setting.
"""
import argparse
import sys

from sim.cli import format_summary
from sim.config import load_config, parse_overrides
from sim.errors import KvsimError
from sim.runner import run_simulation
from sim.workload import load_workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    over = parse_overrides(args.set)
    base = load_config(args.config, over)
    wl = load_workload(base)
    runs = {}
    for pol in ("recompute", "hbm_prefix", "attentionstore"):
        runs[pol] = run_simulation(load_config(args.config, over.merged({"policy.kind": pol})), wl)
    rows = {pol: r.summary for pol, r in runs.items()}
    print(format_summary(list(rows.values()), base, [r.turns for r in runs.values()]))
    r, a = rows["recompute"], rows["attentionstore"]
    print(f"attentionstore vs recompute: TTFT mean {a['ttft_mean_s'] / r['ttft_mean_s'] - 1:+.0%}, "
          f"p99 {a['ttft_p99_s'] / r['ttft_p99_s'] - 1:+.0%}, prefill throughput "
          f"{a['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:.2f}x, cost "
          f"{a['cost_per_1k_turns_usd'] / r['cost_per_1k_turns_usd'] - 1:+.0%}   "
          f"(paper: TTFT up to -87%, prefill throughput up to 7.8x, cost up to -70%)")


if __name__ == "__main__":
    try:
        main()
    except KvsimError as exc:
        print(f"ttft_vs_recompute: error: {exc}", file=sys.stderr)
        sys.exit(2)
