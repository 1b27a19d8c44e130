"""One device call: calibrate, isolated-turn grid, and the trace slice through the real executor.

Run on the GPU machine (the `device` tool):  PYTHONPATH=. python3 bench/gpu_device_run.py --out $OUT
Each stage writes its files into --out as soon as it ends (a timeout still returns what is done) and
is skipped when the wall budget left is too small. On CPU, `--smoke` runs the same stages with the tiny
model (no calibration) to check the script itself.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu import model as M  # noqa: E402
from gpu.calibrate import measure, write_profile  # noqa: E402
from gpu.executor import (Executor, TraceBounds, decoder_for_trace, executor_for_trace,  # noqa: E402
                          serve_trace)
from gpu.isolated import run_grid  # noqa: E402
from gpu.kvstore import HostArena  # noqa: E402
from gpu.plans import PLANS, TRACE_RUNS  # noqa: E402
from sim.files import atomic_write, atomic_write_json  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from sim.units import GB, MS  # noqa: E402

T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def left(budget):
    return budget - (time.perf_counter() - T0)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", default="results/gpu/trace_slice.parquet",
                    help="canonical trace(s), comma-separated; each after the first writes trace_runs_<name>.csv")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--ssd-dir", default="/tmp/kvsim_ssd")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--stages", default="calibrate,isolated,trace")
    ap.add_argument("--trace-runs", default=",".join(TRACE_RUNS), help="run names of gpu/plans.py")
    ap.add_argument("--models", default="llama2-7b,llama2-13b", help="calibration and isolated-grid models")
    ap.add_argument("--sessions", type=int, default=0, help="serve only the first N sessions of the trace")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",")
    cuda = torch.cuda.is_available() and not a.smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "argv": sys.argv}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        info["df"] = subprocess.run(["df", "-h", a.ssd_dir.rsplit("/", 1)[0] or "/"], capture_output=True,
                                    text=True).stdout
        info["mounts"] = Path("/proc/mounts").read_text()[-2000:]
        info["meminfo"] = Path("/proc/meminfo").read_text()[:300]
    except Exception as exc:  # informational only
        info["env_error"] = repr(exc)
    atomic_write_json(out / "env.json", info)
    log(f"device {info['device']} torch {torch.__version__}")

    def calibrate():
        if not cuda:
            return
        try:
            raw = measure(a.models.split(","), ssd_dir=a.ssd_dir, log=log,
                          command="PYTHONPATH=. python3 bench/gpu_device_run.py --out $OUT (kvsim gpu calibrate)")
            write_profile(raw, out / "profile.yaml", out / "calibration_raw.json")
            log("profile written")
        except Exception:
            log("calibrate FAILED\n" + traceback.format_exc())
        torch.cuda.empty_cache()

    def isolated():
        names = a.models.split(",") if cuda else ["tiny"]
        frames = []
        for name in names:
            if left(a.budget_s) < 120:
                log(f"isolated {name}: skipped, {left(a.budget_s):.0f} s left")
                continue
            try:
                shape = M.SHAPES[name] if cuda else M.TINY
                hists, news = ([512, 2048, 3968], [32, 512]) if cuda else ([16, 40], [4, 9])
                model = M.random_decoder(shape, max(hists) + max(news) + 4096, dev, dtype, seed=1)   # + padding slack
                plans = [p for p in PLANS.values() if p.tier != "ssd"]
                frames.append(run_grid(model, plans, hists, news, reps=3 if cuda else 1, ssd_dir=a.ssd_dir, log=log))
                if name == names[0]:     # SSD reads take ~0.3 s/GB: two histories, first model only
                    frames.append(run_grid(model, [p for p in PLANS.values() if p.tier == "ssd"], hists[:2], news,
                                           reps=3 if cuda else 1, ssd_dir=a.ssd_dir, log=log))
                write_csv(pd.concat(frames), out / "isolated.csv")
                del model
                if cuda:
                    torch.cuda.empty_cache()
            except Exception:
                log(f"isolated {name} FAILED\n" + traceback.format_exc())

    def trace_runs():
        for k, path in enumerate(a.trace.split(",")):
            trace_runs_of(path, "trace_runs.csv" if k == 0 else f"trace_runs_{Path(path).stem}.csv")

    def trace_runs_of(path, csv_name):
        trace = read_trace(path)
        if a.sessions:
            trace = trace[trace.session_id.isin(list(dict.fromkeys(trace.session_id))[:a.sessions])].copy()
        if not cuda:
            trace = trace[trace.session_id.isin(sorted(trace.session_id.unique())[:3])].copy()
            trace["prompt_tokens"] = trace["prompt_tokens"].clip(upper=20)
        bounds = TraceBounds.of(trace)
        max_ctx, max_new = bounds.max_ctx, bounds.max_new
        model = decoder_for_trace(M.SHAPES["llama2-7b"] if cuda else M.TINY, trace, dev, dtype)
        shape = model.shape
        try:   # graphed decode against eager decode on the real shapes: tokens (bf16: may flip late)
            ex_g = Executor(model, PLANS["recompute"], max_ctx=max_ctx, max_new=max_new, decode="graph")
            ex_e = Executor(model, PLANS["recompute"], max_ctx=max_ctx, max_new=max_new, decode="eager")
            for e in (ex_g, ex_e):
                e.open_session("chk", max_ctx)
                e.run_turn("chk", 0, [i % shape.vocab for i in range(1, min(300, max_ctx - 40))], 24, 0.0, 0.0)
            same = sum(a == b for a, b in zip(ex_g.sessions["chk"].tokens, ex_e.sessions["chk"].tokens))
            log(f"graph vs eager decode: {same}/{len(ex_e.sessions['chk'].tokens)} tokens equal")
            del ex_g, ex_e
        except Exception:
            log("graph check FAILED\n" + traceback.format_exc())
        frames = []
        busy_est = None
        wp = min(64, max_new // 4)
        # one arena for every run (pinning tens of GB once), with room for the warm-up session
        arena = HostArena(bounds.host_bytes(shape.kv_bytes_per_token, extra_sessions=1, extra_tokens=4 * wp), pinned=cuda)
        log(f"host arena: {arena.raw.numel() / GB:.1f} GB, pinned={arena.raw.is_pinned() if cuda else False}")
        ssd_sessions = sorted(trace.session_id.unique())[:15]
        for run in a.trace_runs.split(","):
            need = (0.5 if run.startswith("ssd") else 1.3) * busy_est if busy_est else 90
            if left(a.budget_s) < need:
                log(f"trace {run}: skipped, {left(a.budget_s):.0f} s left, needs ~{need:.0f}")
                continue
            try:
                ex = executor_for_trace(model, PLANS[run], trace, arena=arena, ssd_dir=a.ssd_dir)
                # SSD reads cost seconds per turn at full slice size: that run serves the first 15 sessions
                tr = trace[trace.session_id.isin(ssd_sessions)] if run.startswith("ssd") else trace
                # warm-up turns on a throwaway session: kernel selection and allocator growth stay out
                wu = pd.DataFrame({"session_id": ["_w", "_w"], "turn": [0, 1], "arrival_s": [0.0, float("nan")],
                                   "think_s": [float("nan"), 0.0], "prompt_tokens": [wp, wp],
                                   "output_tokens": [4, 4]})
                serve_trace(ex, wu)
                t0 = time.perf_counter()
                ex.prepare_trace(tr)
                log(f"trace {run}: {ex.pgraph.captures} prefill graphs captured in {time.perf_counter() - t0:.1f} s")
                t0 = time.perf_counter()
                df = serve_trace(ex, tr)
                ex.close()
                busy_est = time.perf_counter() - t0
                df["run"] = run
                frames.append(df)
                write_csv(pd.concat(frames), out / csv_name)
                log(f"trace {run}: {len(df)} turns in {busy_est:.1f} s, mean TTFT {df.ttft_s.mean() / MS:.1f} ms")
                del ex
            except Exception:
                log(f"trace {run} FAILED\n" + traceback.format_exc())
        arena.release()
        del model
        if cuda:
            torch.cuda.empty_cache()

    stage_fns = {"calibrate": calibrate, "isolated": isolated, "trace": trace_runs}
    for st in stages:       # in the order given: the first stages get the budget first
        if st not in stage_fns:
            raise SystemExit(f"--stages: {st!r}, expected some of {', '.join(stage_fns)}")
        stage_fns[st]()
    log("done")


if __name__ == "__main__":
    main()
