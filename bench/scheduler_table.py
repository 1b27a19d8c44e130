"""TTFT, TPOT and ITL of a config under both engines, per policy: the table issue 14's closing note asks for.

    python bench/scheduler_table.py [--config configs/default.yaml] [--set KEY=VALUE ...]

Each row is one `kvsim run` of the config with scheduler.kind and policy.kind set (the config's own
trace, model and GPU); figures in ms, hit tokens as shares of the context tokens that had history.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.config import load_config, parse_overrides  # noqa: E402
from sim.runner import run_simulation  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    extra = parse_overrides(a.set)
    cols = ("TTFT mean", "TTFT p99", "TPOT mean", "TPOT p99", "ITL p99", "E2E p99", "queue p99")
    keys = ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "itl_p99_s", "e2e_p99_s", "queue_p99_s")
    print(f"{a.config} {' '.join(a.set)}")
    print("| scheduler | policy | " + " | ".join(cols) + " | preemptions | hit HBM / DRAM / SSD tokens | goodput turns/s |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    for kind in ("prefill_first", "chunked"):
        for pol in ("recompute", "hbm_prefix", "attentionstore"):
            s = run_simulation(load_config(a.config, {**extra, "scheduler.kind": kind, "policy.kind": pol})).summary
            ms = " | ".join(f"{1e3 * s[k]:,.0f}" if s[k] == s[k] else "-" for k in keys)
            hits = f"{s['hit_tokens_hbm']:,} / {s['hit_tokens_dram']:,} / {s['hit_tokens_ssd']:,}"
            print(f"| {kind} | {pol} | {ms} | {s['preemptions']} | {hits} | {s['goodput_turns_per_s']:.3f} of {s['turns'] / s['makespan_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
