"""`kvsim gpu calibrate | execute | validate`: the real-GPU side of kvsim, registered on `kvsim`'s parser
through the `kvsim.commands` entry point (pyproject.toml). Heavy imports happen inside the commands."""
from __future__ import annotations

from pathlib import Path

from sim.errors import KvsimError
from sim.files import atomic_write, check_out_file
from sim.models import READ_BUFFER_LAYERS
from sim.units import MS


def register(subparsers) -> None:
    g = subparsers.add_parser("gpu", help="measure a CUDA GPU, run the real executor, validate the simulator")
    sub = g.add_subparsers(dest="gpu_command", required=True, parser_class=type(g))

    p = sub.add_parser("calibrate", help="microbenchmarks -> hardware profile YAML (needs CUDA)")
    p.add_argument("--out", type=Path, required=True, help="profile to write, e.g. configs/hardware/h100.yaml")
    p.add_argument("--raw", type=Path, help="raw samples JSON (default: <out>.raw.json)")
    p.add_argument("--models", default="llama2-7b,llama2-13b", help="comma-separated model shapes")
    p.add_argument("--ssd-dir", type=Path, default=Path("/tmp/kvsim_ssd"), help="folder on the local disk to time")
    p.add_argument("--quick", action="store_true", help="coarse grids (a smoke test, not a profile to use)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("execute", help="serve a canonical trace on the GPU executor, one turn at a time (needs CUDA)")
    p.add_argument("--trace", type=Path, required=True, help="canonical trace, e.g. results/gpu/trace_slice.parquet")
    p.add_argument("--tier", choices=("recompute", "dram", "ssd"), default="dram")
    p.add_argument("--sync", action="store_true", help="load all layers before computing (no layer-wise preload)")
    p.add_argument("--read-buffer-layers", type=int, default=READ_BUFFER_LAYERS,
                   help=f"layers loaded ahead of the compute (default {READ_BUFFER_LAYERS})")
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--ssd-dir", type=Path, default=Path("/tmp/kvsim_ssd"))
    p.add_argument("--out", type=Path, required=True, help="per-turn measurements (.csv)")
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("validate", help="measured runs vs the simulator with the measured profile (CPU, offline)")
    # defaults: the committed device run whose calibration (7B + 13B) is configs/hardware/h100.yaml and
    # whose trace runs served the real ShareGPT slice on the same machine (results/gpu/README.md)
    p.add_argument("--measured", type=Path, default=Path("results/gpu/run10_sharegpt/trace_runs.csv"))
    p.add_argument("--isolated", type=Path, default=None, help="isolated-turn grid (.csv), e.g. "
                   "results/gpu/run9_shared_ssd/isolated.csv with that run's profile")
    p.add_argument("--trace", type=Path, default=Path("results/gpu/trace_slice_sharegpt.parquet"))
    p.add_argument("--profile", type=Path, default=Path("configs/hardware/h100.yaml"))
    p.add_argument("--model", default="llama2-7b", help="the model the measured runs served")
    p.add_argument("--gpus", type=int, default=1, help="tensor-parallel GPUs of the measured runs (gpu/tp_executor.py); "
                   "the profile must have been measured at that TP degree")
    p.add_argument("--out", type=Path, default=Path("results/gpu/run10_sharegpt"),
                   help="folder for the per-turn tables, scatter plots and validation_summary.json (default "
                        "results/gpu/run10_sharegpt: with the other defaults this reproduces the committed "
                        "run-10 validation, and writes over it)")
    p.set_defaults(func=cmd_validate)


def check_writable_file(path: Path, flag: str) -> None:
    """Fail before any work if a result file cannot be written at `path` (sim.files.check_out_file)."""
    check_out_file(path, flag)


def _need_cuda(what: str):
    import torch

    if not torch.cuda.is_available():
        raise KvsimError(f"kvsim gpu {what}: no CUDA device visible; expected a machine with an NVIDIA GPU")


def _model_names(flag: str, text: str, most: int | None = None) -> list[str]:
    """Names of shapes the executor runs (`gpu.model.SHAPES`), comma-separated."""
    from gpu.model import SHAPES

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in SHAPES]
    if bad or not names or (most is not None and len(names) > most):
        what = repr(bad[0]) if bad else repr(text)
        raise KvsimError(f"{flag}: {what}, expected {'one of' if most == 1 else 'names from'} {', '.join(SHAPES)}")
    return names


def cmd_calibrate(args) -> int:
    models = _model_names("--models", args.models)
    raw_out = args.raw or args.out.with_suffix(".raw.json")
    check_writable_file(args.out, "--out")
    check_writable_file(raw_out, "--raw" if args.raw else "raw samples (<out>.raw.json)")
    _need_cuda("calibrate")
    from gpu.calibrate import measure, write_profile

    raw = measure(models, ssd_dir=args.ssd_dir, quick=args.quick,
                  command=f"kvsim gpu calibrate --out {args.out}")
    write_profile(raw, args.out, raw_out)
    print(f"profile: {args.out}")
    return 0


def cmd_execute(args) -> int:
    (model_name,) = _model_names("--model", args.model, most=1)
    if args.read_buffer_layers < 1:
        raise KvsimError(f"--read-buffer-layers: {args.read_buffer_layers}, expected an integer >= 1")
    check_writable_file(args.out, "--out")
    _need_cuda("execute")
    import torch

    from gpu.executor import decoder_for_trace, executor_for_trace, serve_trace
    from gpu.model import SHAPES
    from gpu.plans import ServePlan, run_name
    from sim.trace import read_trace

    trace = read_trace(args.trace)
    plan = ServePlan(args.tier, overlap=not args.sync, read_buffer_layers=args.read_buffer_layers)
    model = decoder_for_trace(SHAPES[model_name], trace, "cuda", torch.bfloat16)
    ex = executor_for_trace(model, plan, trace, ssd_dir=args.ssd_dir)
    try:
        df = serve_trace(ex, trace)
    finally:
        ex.close()
    df["run"] = run_name(plan)
    atomic_write(args.out, lambda tmp: df.to_csv(tmp, index=False))
    print(f"{len(df)} turns, mean TTFT {df.ttft_s.mean() / MS:.1f} ms -> {args.out}")
    return 0


def cmd_validate(args) -> int:
    from gpu.validate import validate
    from sim.cli import check_writable_dir

    check_writable_dir(args.out, "--out")
    iso = None if args.isolated is None or str(args.isolated).lower() == "none" else args.isolated
    res = validate(args.measured, iso, args.trace, args.profile, args.out, model=args.model, gpus=args.gpus)
    for run, s in res["trace"].items():
        extra = (f", speed-up vs recompute measured {s['speedup_vs_recompute_meas']:.2f} simulated "
                 f"{s['speedup_vs_recompute_sim']:.2f} (error {s['speedup_err'] * 100:+.1f}%)"
                 if "speedup_err" in s else "")
        print(f"{run:13s} turns {s['turns']:4d}  TTFT MAPE {s['ttft_mape'] * 100:5.1f}%  "
              f"prefill MAPE {s['prefill_mape'] * 100:5.1f}%{extra}")
    if "isolated" in res:
        i = res["isolated"]
        print(f"isolated turns: TTFT MAPE {i['ttft_mape'] * 100:.1f}%; preload bandwidth "
              f"{i['preload_vs_peak_median'] * 100:.1f}% of pinned peak ({i['pinned_peak_gbps']:.1f} GB/s); "
              f"overlap efficiency (load-bound points) {i['overlap_efficiency_load_bound']:.3f}")
    print(f"results: {args.out}/validation_summary.json")
    return 0

