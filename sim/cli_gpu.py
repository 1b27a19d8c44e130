"""`kvsim gpu calibrate | execute | validate`: the real-GPU side of kvsim (gpu/), on the lead's parser."""
from __future__ import annotations

from pathlib import Path

from sim.errors import KvsimError


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
    p.add_argument("--read-buffer-layers", type=int, default=2)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--ssd-dir", type=Path, default=Path("/tmp/kvsim_ssd"))
    p.add_argument("--out", type=Path, required=True, help="per-turn measurements (.csv)")
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("validate", help="measured runs vs the simulator with the measured profile (CPU, offline)")
    # defaults: device run 10, whose calibration (7B + 13B) is configs/hardware/h100.yaml and whose
    # trace runs served the real ShareGPT slice on the same machine (no isolated grid in that call)
    p.add_argument("--measured", type=Path, default=Path("results/gpu/run10_sharegpt/trace_runs.csv"))
    p.add_argument("--isolated", type=Path, default=None, help="isolated-turn grid (.csv), e.g. "
                   "results/gpu/run9_shared_ssd/isolated.csv with that run's profile")
    p.add_argument("--trace", type=Path, default=Path("results/gpu/trace_slice_sharegpt.parquet"))
    p.add_argument("--profile", type=Path, default=Path("configs/hardware/h100.yaml"))
    p.add_argument("--out", type=Path, default=Path("results/gpu/run10_sharegpt"))
    p.set_defaults(func=cmd_validate)


def _need_cuda(what: str):
    import torch

    if not torch.cuda.is_available():
        raise KvsimError(f"kvsim gpu {what}: no CUDA device visible; expected a machine with an NVIDIA GPU")


def cmd_calibrate(args) -> int:
    _need_cuda("calibrate")
    from gpu.calibrate import measure, write_profile
    from gpu.model import SHAPES

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in SHAPES or m == "tiny"]
    if bad:
        raise KvsimError(f"--models: {bad[0]!r}, expected names from {', '.join(k for k in SHAPES if k != 'tiny')}")
    raw = measure(models, ssd_dir=args.ssd_dir, quick=args.quick,
                  command=f"kvsim gpu calibrate --out {args.out}")
    write_profile(raw, args.out, args.raw or args.out.with_suffix(".raw.json"))
    print(f"profile: {args.out}")
    return 0


def cmd_execute(args) -> int:
    _need_cuda("execute")
    import torch

    from gpu import model as M
    from gpu.executor import Executor, ServePlan, serve_trace, session_capacity
    from sim.trace import read_trace

    if args.model not in M.SHAPES or args.model == "tiny":
        raise KvsimError(f"--model: {args.model!r}, expected llama2-7b or llama2-13b")
    if args.read_buffer_layers < 1:
        raise KvsimError(f"--read-buffer-layers: {args.read_buffer_layers}, expected an integer >= 1")
    trace = read_trace(args.trace)
    shape = M.SHAPES[args.model]
    caps = [session_capacity(g) for _, g in trace.groupby("session_id")]
    max_ctx = max(caps) + 8
    max_new = int((trace.prompt_tokens + trace.output_tokens).max()) + 8
    model = M.random_decoder(shape, max_ctx + 4096, "cuda", torch.bfloat16, seed=2)   # + padding slack
    plan = ServePlan(args.tier, overlap=not args.sync, read_buffer_layers=args.read_buffer_layers)
    ex = Executor(model, plan, max_ctx=max_ctx, max_new=max_new,
                  host_bytes=sum(caps) * shape.kv_bytes_per_token_layer(2) * shape.layers + len(caps) * 8192,
                  ssd_dir=args.ssd_dir, detail_events=False)
    try:
        df = serve_trace(ex, trace)
    finally:
        ex.close()
    df["run"] = f"{args.tier}_{'sync' if args.sync else 'overlap'}" if args.tier != "recompute" else "recompute"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(args.out)
    print(f"{len(df)} turns, mean TTFT {df.ttft_s.mean() * 1e3:.1f} ms -> {args.out}")
    return 0


def cmd_validate(args) -> int:
    from gpu.validate import validate

    iso = None if args.isolated is None or str(args.isolated).lower() == "none" else args.isolated
    res = validate(args.measured, iso, args.trace, args.profile, args.out)
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

