"""`kvsim`: run, config, trace, sweep, plot, plan, gpu, roundattn. Bad input -> one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

from sim.errors import KvsimError, show
from sim.files import check_out_dir
from sim.plugins import register_commands
from sim.units import GB, TB


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


SUMMARY_ROWS = (
    ("turns", "turns", "{:.0f}"), ("sessions", "sessions", "{:.0f}"),
    ("TTFT mean", "ttft_mean_s", "{:.3f} s"), ("TTFT p50", "ttft_p50_s", "{:.3f} s"),
    ("TTFT p90", "ttft_p90_s", "{:.3f} s"), ("TTFT p99", "ttft_p99_s", "{:.3f} s"),
    ("TPOT mean", "tpot_mean_s", "{:.4f} s"), ("TPOT p99", "tpot_p99_s", "{:.4f} s"),
    ("ITL p99", "itl_p99_s", "{:.4f} s"), ("E2E p99", "e2e_p99_s", "{:.2f} s"),
    ("goodput", "goodput_turns_per_s", "{:.3f} turns/s"),
    ("queue wait mean", "queue_mean_s", "{:.3f} s"),
    ("prefill throughput", "prefill_tokens_per_s", "{:,.0f} tok/s"),
    ("hit rate HBM", "hit_rate_hbm", "{:.1%}"), ("hit rate DRAM", "hit_rate_dram", "{:.1%}"),
    ("hit rate SSD", "hit_rate_ssd", "{:.1%}"), ("miss rate", "miss_rate", "{:.1%}"),
    ("reused context", "reused_token_fraction", "{:.1%}"),
    ("truncated turns", ("truncated_turns", "truncated_fraction"), "{:.0f} ({:.1%})"),
    ("GPU busy", "gpu_busy_s", "{:.1f} s"),
    ("loaded to HBM", "bytes_h2d", "{:,.1f} GB", 1 / GB), ("saved from HBM", "bytes_d2h", "{:,.1f} GB", 1 / GB),
    ("SSD read / written", ("bytes_ssd_read", "bytes_ssd_write"), "{:,.1f} / {:,.1f} GB", 1 / GB),
    ("peak KV in HBM", "peak_hbm_bytes", "{:,.2f} GB", 1 / GB), ("peak KV in DRAM", "peak_dram_bytes", "{:,.1f} GB", 1 / GB),
    ("makespan", "makespan_s", "{:.1f} s"), ("cost", "cost_usd", "${:.3f}"),
    ("cost / 1k turns", "cost_per_1k_turns_usd", "${:.4f}"),
)
TRUNCATED_WARN_FRACTION = 0.10  # above this, the run mostly measures truncation, not reuse
# The queue grows without bound when the mean wait of the last tenth of arrivals is this many times
# that of the first tenth, and at least QUEUE_GROWTH_MIN_S (a busy but stable server jitters).
QUEUE_GROWTH_RATIO, QUEUE_GROWTH_MIN_S = 5.0, 10.0


def _cell(row, s) -> str:
    keys = row[1] if isinstance(row[1], tuple) else (row[1],)
    scale = row[3] if len(row) > 3 else 1
    if any(k not in s or s[k] != s[k] for k in keys):  # not in this summary, or NaN (no 2-token reply)
        return "-"
    return row[2].format(*(s[k] * scale for k in keys))


def describe_run(cfg) -> list[str]:
    """What a run simulated, in two lines: model and hardware, then the workload."""
    from pathlib import Path

    g, ssd, wl = cfg.gpu, cfg.ssd, cfg.workload
    hw = (f"model {cfg.model} on {g.count} x {g.name}; DRAM {cfg.host.dram_bytes / GB:.4g} GB; "
          f"SSD {ssd.bytes / TB:.4g} TB ({ssd.read_gbps:g} / {ssd.write_gbps:g} GB/s read / write)"
          + (f"; measured profile {Path(cfg.hardware_profile).name}" if cfg.hardware_profile else ""))
    work = f"trace {Path(wl.trace).name}" if wl.trace else f"synthetic, {wl.synthetic.n_sessions:,} sessions"
    if wl.max_sessions:
        work += f", first {wl.max_sessions:,} sessions"
    work += (f", Poisson arrivals at {wl.session_rate_per_s:g} sessions/s" if wl.session_rate_per_s
             else ", the trace's arrival times")
    if wl.think_time_mean_s is not None:
        work += f", {wl.think_time_dist} think times of mean {wl.think_time_mean_s:g} s"
    return [hw, f"workload: {work}"]


def summary_warnings(summary: dict, turns=None) -> list[str]:
    """Why a summary may not mean what it seems: many truncated turns, or a queue that keeps growing
    (arrivals faster than service: the means then depend on how long the trace is)."""
    out = []
    n, trunc = summary["turns"], summary["truncated_turns"]
    if n and trunc / n > TRUNCATED_WARN_FRACTION:
        out.append(f"{trunc / n:.0%} of turns were truncated (history over the context window): the figures "
                   f"measure truncation as much as reuse")
    if turns is not None and len(turns) >= 20:
        q = turns.sort_values("arrival_s", kind="stable")["queue_s"].to_numpy()
        tenth = len(q) // 10
        first, last = float(q[:tenth].mean()), float(q[-tenth:].mean())
        if last >= QUEUE_GROWTH_MIN_S and last > QUEUE_GROWTH_RATIO * first:
            out.append(f"the queue grows without bound: mean wait {last:,.1f} s for the last tenth of arrivals "
                       f"vs {first:,.1f} s for the first (arrivals outpace service; lower the rate or add GPUs)")
    return out


def format_summary(summaries: list, cfg=None, turns: list | None = None) -> str:
    """The one summary table: what ran (given `cfg`), one column per summary, then warnings
    (queue growth needs each summary's per-turn table in `turns`)."""
    names = [f"{s['policy']}" for s in summaries]
    rows_in = [{**s, "truncated_fraction": s["truncated_turns"] / s["turns"] if s["turns"] else 0.0}
               for s in summaries]
    w0 = max(len(r[0]) for r in SUMMARY_ROWS)
    cols = [[_cell(r, s) for r in SUMMARY_ROWS] for s in rows_in]
    widths = [max(len(n), *(len(c) for c in col)) for n, col in zip(names, cols)]
    lines = describe_run(cfg) if cfg is not None else []
    lines.append(" " * w0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths)))
    for k, row in enumerate(SUMMARY_ROWS):
        lines.append(row[0].ljust(w0) + "  " + "  ".join(col[k].rjust(w) for col, w in zip(cols, widths)))
    warned = [summary_warnings(s, turns[i] if turns else None) for i, s in enumerate(summaries)]
    for w in dict.fromkeys(w for ws in warned for w in ws):  # each once, in order
        who = [s["policy"] for s, ws in zip(summaries, warned) if w in ws]
        lines.append(f"warning: {w}" if len(who) == len(summaries) else f"warning: {', '.join(who)}: {w}")
    return "\n".join(lines)


def default_out_dir(cfg, overrides: dict):
    """results/<name>, or with overrides results/<name>-<8 hex of the resolved config> (the key
    sweeps use), so that a run with --set never replaces the results of another run."""
    from pathlib import Path

    from sim.config import config_to_dict
    from sim.sweep import config_key

    if not overrides:
        return Path("results") / cfg.name
    return Path("results") / f"{cfg.name}-{config_key(config_to_dict(cfg))[:8]}"


def check_writable_dir(out, flag: str) -> None:
    """Fail before simulating if the results cannot land in `out`: one line naming the folder."""
    check_out_dir(out, flag)


def _replaces_other_config(out, cfg) -> bool:
    import json

    from sim.config import config_to_dict

    old = out / "config.json"
    try:
        return old.is_file() and json.loads(old.read_text()) != json.loads(json.dumps(config_to_dict(cfg)))
    except (OSError, ValueError):
        return True


def cmd_run(args) -> int:
    from pathlib import Path

    from sim.config import POLICIES, load_config, parse_overrides
    from sim.runner import run_simulation, write_results

    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)
    policies = [p.strip() for p in args.compare.split(",")] if args.compare is not None else [cfg.policy.kind]
    for pol in policies:  # every policy checked before the first one runs
        if pol not in POLICIES:
            raise KvsimError(f"--compare {show(args.compare)}: {pol!r}: expected policies from {', '.join(POLICIES)}")
    if len(set(policies)) < len(policies):  # both would write the same folder
        raise KvsimError(f"--compare {show(args.compare)}: a policy given twice; expected each once")
    if args.out is not None and not args.out.strip():
        raise KvsimError("--out '': expected a folder for the results (omit --out for the default)")
    out_root = Path(args.out) if args.out is not None else default_out_dir(cfg, overrides)
    check_writable_dir(out_root, "--out" if args.out else "output folder")
    results = []
    for pol in policies:
        c = load_config(args.config, overrides.merged({"policy.kind": pol})) if args.compare else cfg
        res, out = run_simulation(c), (out_root / pol if args.compare else out_root)
        if _replaces_other_config(out, res.config):
            print(f"note: {out} held the results of a different config; replaced", file=sys.stderr)
        try:
            write_results(res, out)
        except OSError as exc:
            raise KvsimError(f"{out}: cannot write the results ({exc.strerror or exc})") from None
        results.append(res)
    print(format_summary([r.summary for r in results], cfg, [r.turns for r in results]))
    print(f"results: {out_root}")
    return 0


def cmd_config_keys(args) -> int:
    from sim.config import format_config_keys

    print(format_config_keys(args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvsim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="simulate one config and print its summary",
                       epilog="Every config key with its default, unit, bounds and help: kvsim config keys")
    r.add_argument("config", help="YAML config, e.g. configs/default.yaml ({} in a file: every default)")
    r.add_argument("--out", help="output folder (default results/<name>; with --set, results/<name>-<8 hex "
                                 "of the resolved config>, so runs with other overrides never replace it)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. ssd.read_gbps=12 (keys: kvsim config keys)")
    r.add_argument("--compare", metavar="POLICIES", help="comma list, e.g. recompute,hbm_prefix,attentionstore")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("config", help="about config files").add_subparsers(dest="what", required=True,
                                                                          parser_class=_Parser)
    k = c.add_parser("keys", help="every config key: type, default, unit, bounds, choices and help")
    k.add_argument("--format", choices=("text", "markdown"), default="text")
    k.set_defaults(func=cmd_config_keys)
    register_commands(sub)  # trace, sweep, ... and the entry points of other packages (gpu, roundattn)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KvsimError as exc:
        # a path from argv may hold bytes that are not UTF-8 (surrogates): escaped, never an encoding error
        print(f"kvsim: error: {exc}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
