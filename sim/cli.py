"""`kvsim`: run, trace, sweep, plot, plan, gpu, roundattn. Bad input -> one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

import yaml

from sim.errors import KvsimError
from sim.plugins import register_commands


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_set(items, example="host.dram_bytes=256GB"):
    """--set KEY=VALUE items -> {dotted key: value}, the value typed as YAML reads it (3, true, 128GB)."""
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise KvsimError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {example}")
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise KvsimError(f"--set {item!r}: the value is not valid YAML ({why}); expected e.g. --set {example}") from None
    return out


SUMMARY_ROWS = (
    ("turns", "turns", "{:.0f}"), ("sessions", "sessions", "{:.0f}"),
    ("TTFT mean", "ttft_mean_s", "{:.3f} s"), ("TTFT p50", "ttft_p50_s", "{:.3f} s"),
    ("TTFT p90", "ttft_p90_s", "{:.3f} s"), ("TTFT p99", "ttft_p99_s", "{:.3f} s"),
    ("prefill throughput", "prefill_tokens_per_s", "{:,.0f} tok/s"),
    ("hit rate HBM", "hit_rate_hbm", "{:.1%}"), ("hit rate DRAM", "hit_rate_dram", "{:.1%}"),
    ("hit rate SSD", "hit_rate_ssd", "{:.1%}"), ("miss rate", "miss_rate", "{:.1%}"),
    ("reused context", "reused_token_fraction", "{:.1%}"), ("GPU busy", "gpu_busy_s", "{:.1f} s"),
    ("loaded to HBM", "bytes_h2d", "{:,.1f} GB", 1e-9), ("saved from HBM", "bytes_d2h", "{:,.1f} GB", 1e-9),
    ("SSD read / written", ("bytes_ssd_read", "bytes_ssd_write"), "{:,.1f} / {:,.1f} GB", 1e-9),
    ("peak KV in HBM", "peak_hbm_bytes", "{:,.2f} GB", 1e-9), ("peak KV in DRAM", "peak_dram_bytes", "{:,.1f} GB", 1e-9),
    ("makespan", "makespan_s", "{:.1f} s"), ("cost", "cost_usd", "${:.3f}"),
    ("cost / 1k turns", "cost_per_1k_turns_usd", "${:.4f}"),
)


def _cell(row, s) -> str:
    keys = row[1] if isinstance(row[1], tuple) else (row[1],)
    scale = row[3] if len(row) > 3 else 1
    return row[2].format(*(s[k] * scale for k in keys))


def format_summary(summaries: list) -> str:
    names = [f"{s['policy']}" for s in summaries]
    w0 = max(len(r[0]) for r in SUMMARY_ROWS)
    cols = [[_cell(r, s) for r in SUMMARY_ROWS] for s in summaries]
    widths = [max(len(n), *(len(c) for c in col)) for n, col in zip(names, cols)]
    lines = [" " * w0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for k, row in enumerate(SUMMARY_ROWS):
        lines.append(row[0].ljust(w0) + "  " + "  ".join(col[k].rjust(w) for col, w in zip(cols, widths)))
    return "\n".join(lines)


def cmd_run(args) -> int:
    from pathlib import Path

    from sim.config import POLICIES, load_config
    from sim.runner import run_simulation, write_results

    overrides = _parse_set(args.set)
    cfg = load_config(args.config, overrides)
    policies = [p.strip() for p in args.compare.split(",")] if args.compare else [cfg.policy.kind]
    for pol in policies:  # every policy checked before the first one runs
        if pol not in POLICIES:
            raise KvsimError(f"--compare {args.compare}: {pol!r}: expected policies from {', '.join(POLICIES)}")
    out_root = Path(args.out or f"results/{cfg.name}")
    summaries = []
    for pol in policies:
        c = load_config(args.config, {**overrides, "policy.kind": pol}) if args.compare else cfg
        res = run_simulation(c)
        write_results(res, out_root / pol if args.compare else out_root)
        summaries.append(res.summary)
    print(format_summary(summaries))
    print(f"results: {out_root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvsim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="simulate one config and print its summary")
    r.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    r.add_argument("--out", help="output folder (default results/<name>)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key by dotted path")
    r.add_argument("--compare", metavar="POLICIES", help="comma list, e.g. recompute,hbm_prefix,attentionstore")
    r.set_defaults(func=cmd_run)
    register_commands(sub)  # trace, sweep, ... and the entry points of other packages (gpu, roundattn)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KvsimError as exc:
        print(f"kvsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
