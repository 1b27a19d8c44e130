"""`kvsim gpu validate`: the measured GPU runs against the simulator fed with the measured profile.

Two checks:
- Trace slice: the same canonical trace, scheduler settings (`scheduler.max_batch: 1`, FCFS) and
  policy as each executor run, through `sim.runner.run_simulation` with `hardware_profile` set; per-turn
  TTFT error, MAPE, and the error of the reuse-vs-recompute speed-up (mean TTFT ratio).
  Per turn, the simulator is given the arrivals the real run saw (each turn's measured arrival_s), as
  Vidur-style validation replays request arrival times: with think-time arrivals, a turn whose
  previous reply ends a millisecond later in one run than the other can land behind a different
  200 ms decode, so per-turn errors would measure that chaos, not the model. The think-time
  (closed-loop) replay is reported beside it (`*_think_time`): its means and percentiles are
  comparable, its per-turn errors less so.
- Isolated turns: each grid point (model, history, new tokens, tier, sync/overlapped load) against the
  cost model's single-turn formula (`sim.costmodel`: per-layer tables, link tables, the
  pipeline closed form: `history_load_layer_s`, `prefill_iteration`), with no simulator queue in between.

Works offline from the committed measurements (results/gpu/*.csv); needs no GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gpu.plans import TRACE_RUNS, sim_overrides
from sim.config import load_config
from sim.costmodel import build_cost_model
from sim.errors import KvsimError
from sim.files import atomic_write, atomic_write_text
from sim.units import GB, MS

# How each executor run is described to the simulator: the run-plan table's (gpu/plans.py).
SIM_OVERRIDES_BY_RUN = {run: sim_overrides(run) for run in TRACE_RUNS}
# The model the executor serves traces with (`kvsim gpu execute --model`, bench/gpu_device_run.py).
TRACE_MODEL = "llama2-7b"


def sim_config(run: str, trace, profile, model: str = TRACE_MODEL, n_sessions: int | None = None,
               output_cap: int | None = None, gpus: int = 1):
    """`gpus` > 1: a tensor-parallel executor run, described by a profile measured at that TP degree."""
    base = {"name": f"gpu-validate-{run}", "model": model, "hardware_profile": str(profile),
            "gpu": {"name": "h100-80gb", "count": gpus},
            "host": {"dram_bytes": "400GB"}, "ssd": {"bytes": "2TB"},
            "scheduler": {"kind": "prefill_first", "max_batch": 1, "max_prefill_tokens": 1 << 20, "lookahead_jobs": 0},
            "workload": {"trace": str(trace)},
            "policy": {"async_save": True, "scheduler_aware_fetch": False}}
    over = dict(SIM_OVERRIDES_BY_RUN[run])
    if n_sessions is not None:
        over["workload.max_sessions"] = n_sessions
    if output_cap is not None:
        over["workload.max_output_tokens"] = output_cap
    return load_config(base, overrides=over)


def simulate_run(run: str, trace, profile, n_sessions=None, model=TRACE_MODEL, gpus: int = 1) -> pd.DataFrame:
    from sim.runner import run_simulation

    return run_simulation(sim_config(run, trace, profile, model, n_sessions, gpus=gpus)).turns


def realized_trace(trace, measured: pd.DataFrame, out) -> Path:
    """`trace` restricted to the measured sessions, each turn arriving when it arrived in the real run."""
    from sim.trace import read_trace, write_trace

    t = read_trace(trace)
    t = t.assign(session_id=t.session_id.astype(str))
    m = measured[["session_id", "turn", "arrival_s"]].assign(session_id=measured.session_id.astype(str))
    j = t.drop(columns=["arrival_s"]).merge(m, on=["session_id", "turn"], how="inner")
    if len(j) != len(m):
        raise KvsimError(f"{trace}: {len(m) - len(j)} measured turns are not in the trace")
    j["think_s"] = float("nan")
    write_trace(j[t.columns], out)
    return Path(out)


def compare_trace(measured: pd.DataFrame, trace, profile, model=TRACE_MODEL, gpus: int = 1) -> tuple[pd.DataFrame, dict]:
    """Per-turn measured vs simulated TTFT for every run in `measured` (column `run`)."""
    if "run" not in measured.columns:
        raise KvsimError("measured trace runs: run: missing column, expected one of " + ", ".join(SIM_OVERRIDES_BY_RUN))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvsim_validate_") as tmp:
        return _compare_trace(measured, trace, profile, model, Path(tmp), gpus)


def _compare_trace(measured, trace, profile, model, tmp: Path, gpus: int = 1) -> tuple[pd.DataFrame, dict]:
    rows, summary = [], {}
    for run, meas in measured.groupby("run", sort=False):
        if run not in SIM_OVERRIDES_BY_RUN:
            raise KvsimError(f"measured trace runs: run: {run!r}, expected one of "
                             f"{', '.join(SIM_OVERRIDES_BY_RUN)}")
        meas = meas.assign(session_id=meas.session_id.astype(str))
        sim_turns = simulate_run(run, realized_trace(trace, meas, tmp / f"{run}.parquet"), profile, model=model,
                                 gpus=gpus)
        sim_turns = sim_turns.assign(session_id=sim_turns.session_id.astype(str))
        closed_loop = simulate_run(run, trace, profile, n_sessions=meas.session_id.nunique(), model=model, gpus=gpus)
        closed_loop = closed_loop.assign(session_id=closed_loop.session_id.astype(str))
        turns = meas.merge(sim_turns[["session_id", "turn", "ttft_s", "queue_s", "load_s", "prefill_s"]],
                           on=["session_id", "turn"], suffixes=("_meas", "_sim"), how="inner")
        turns = turns.merge(closed_loop[["session_id", "turn", "ttft_s"]].rename(
            columns={"ttft_s": "ttft_s_sim_think_time"}), on=["session_id", "turn"], how="left")
        if len(turns) != len(meas):
            raise KvsimError(f"measured trace runs: run {run}: {len(meas) - len(turns)} turns have no simulated match")
        turns["run"] = run
        turns["ttft_err"] = (turns.ttft_s_sim - turns.ttft_s_meas) / turns.ttft_s_meas
        # prefill alone (no queue): executor start -> first token, against the simulator's prefill
        turns["prefill_s_meas"] = turns.first_token_s - turns.start_s
        turns["prefill_err"] = (turns.prefill_s - turns.prefill_s_meas) / turns.prefill_s_meas
        turns["ttft_err_think_time"] = (turns.ttft_s_sim_think_time - turns.ttft_s_meas) / turns.ttft_s_meas
        rows.append(turns)
        summary[run] = {"turns": len(turns), "ttft_mape": float(turns.ttft_err.abs().mean()),
                        "ttft_mean_meas_s": float(turns.ttft_s_meas.mean()),
                        "ttft_mean_sim_s": float(turns.ttft_s_sim.mean()),
                        "ttft_p50_meas_s": float(turns.ttft_s_meas.median()),
                        "ttft_p50_sim_s": float(turns.ttft_s_sim.median()),
                        "ttft_p99_meas_s": float(turns.ttft_s_meas.quantile(0.99)),
                        "ttft_p99_sim_s": float(turns.ttft_s_sim.quantile(0.99)),
                        "ttft_mape_think_time": float(turns.ttft_err_think_time.abs().mean()),
                        "ttft_mean_sim_think_time_s": float(turns.ttft_s_sim_think_time.mean()),
                        "ttft_p50_sim_think_time_s": float(turns.ttft_s_sim_think_time.median()),
                        "prefill_mape": float(turns.prefill_err.abs().mean()),
                        "service_mean_meas_s": float((turns.end_s - turns.start_s).mean()),
                        # host time between one turn's end and the next queued turn's start: after a
                        # turn whose session goes on, the profile's host_next_turn_ms (ranks agreeing)
                        "host_gap_ms_median_queued": _host_gap_ms(meas)}
    per_turn = pd.concat(rows, ignore_index=True)
    if "recompute" in summary:
        for run in summary:
            if run == "recompute" or run.startswith("ssd"):
                continue   # the SSD run serves a smaller slice: no like-for-like recompute baseline
            speedup_meas = summary["recompute"]["ttft_mean_meas_s"] / summary[run]["ttft_mean_meas_s"]
            speedup_sim = summary["recompute"]["ttft_mean_sim_s"] / summary[run]["ttft_mean_sim_s"]
            summary[run]["speedup_vs_recompute_meas"] = speedup_meas
            summary[run]["speedup_vs_recompute_sim"] = speedup_sim
            summary[run]["speedup_err"] = (speedup_sim - speedup_meas) / speedup_meas
    return per_turn, summary


def _host_gap_ms(meas: pd.DataFrame) -> float:
    by_start = meas.sort_values("start_s")
    gap_ms = (by_start.start_s - by_start.end_s.shift(1)) * 1e3
    queued = by_start.queue_s > 0.005
    return float(gap_ms[queued].median()) if queued.any() else float("nan")


def predict_isolated(iso: pd.DataFrame, profile) -> pd.DataFrame:
    """Cost-model TTFT of each isolated turn: what `sim.engine` computes for one turn with no queue."""
    out = []
    costs = {}
    for r in iso.itertuples():
        if r.model not in costs:
            costs[r.model] = build_cost_model(load_config({"model": r.model, "hardware_profile": str(profile),
                                                           "gpu": {"name": "h100-80gb"}}))
        c = costs[r.model]
        n, h = r.new_tokens, r.history_tokens
        compute = c.prefill_layer_s(n, h)
        chunk = h * c.shape.kv_bytes_per_token_layer
        load = c.history_load_layer_s(chunk if r.tier == "dram" else 0.0, chunk if r.tier == "ssd" else 0.0)
        t = c.prefill_iteration(load, compute, c.prefill_head_s(n), int(r.read_buffer_layers),
                                bool(r.overlap)).total_s
        out.append({"pred_ttft_s": t, "pred_load_s": load * c.shape.layers, "pred_compute_s": compute * c.shape.layers})
    res = pd.concat([iso.reset_index(drop=True), pd.DataFrame(out)], axis=1)
    res["ttft_err"] = (res.pred_ttft_s - res.ttft_s) / res.ttft_s
    return res


def isolated_figures(iso: pd.DataFrame, profile) -> dict:
    """Achieved preload bandwidth vs pinned peak, and overlap efficiency, from the isolated grid."""
    from sim.costmodel import load_profile

    prof = load_profile(profile)
    peak = max(prof.links["h2d_pinned"].ys)
    med = iso.groupby(["model", "tier", "overlap", "hist_tokens", "prompt_tokens"]).median(numeric_only=True)
    bw = []
    for (model, tier, overlap, h, n), r in med.iterrows():
        if tier == "dram" and not overlap:
            bw.append((h, r.kv_bytes_loaded / (r.load_busy_ms * MS) / GB))
    eff = []
    for (model, tier, overlap, h, n), r in med.iterrows():
        if tier != "dram" or not overlap:
            continue
        load = med.loc[(model, "dram", False, h, n)].load_busy_ms
        compute = med.loc[(model, "hbm", True, h, n)].ttft_s * 1e3     # same turn with its KV already in HBM
        eff.append({"model": model, "hist_tokens": h, "prompt_tokens": n, "ttft_overlap_ms": r.ttft_s * 1e3,
                    "load_ms": load, "compute_ms": compute,
                    "efficiency": r.ttft_s * 1e3 / max(load, compute)})
    eff = pd.DataFrame(eff)
    return {"pinned_peak_gbps": peak,
            "preload_gbps_by_history": [{"hist_tokens": int(h), "gbps": g} for h, g in bw],
            "preload_vs_peak_median": float(np.median([g for _, g in bw]) / peak) if bw else None,
            "preload_vs_peak_hist_ge_2048": (float(np.median([g for h, g in bw if h >= 2048]) / peak)
                                             if any(h >= 2048 for h, _ in bw) else None),
            "overlap_efficiency": eff.to_dict("records"),
            "overlap_efficiency_load_bound": (float(eff[eff.load_ms >= eff.compute_ms].efficiency.median())
                                              if len(eff) and (eff.load_ms >= eff.compute_ms).any() else None),
            "overlap_efficiency_all_median": float(eff.efficiency.median()) if len(eff) else None}


def plot_title(device_run: str, profile, models) -> str:
    """What a validation plot shows: the device run, the model(s) and the GPU (the profile's `device`)."""
    from sim.costmodel import load_profile

    device = load_profile(profile).device or "a GPU its profile does not name"
    return f"{device_run}: {', '.join(dict.fromkeys(models))} on {device}"


def device_run_name(measurements) -> str:
    """A device run's name: the folder holding its measurements, under results/gpu/ where it is there
    (results/gpu/run11_ssd/sharegpt/trace_runs.csv -> run11_ssd/sharegpt)."""
    folder = Path(measurements).resolve().parent
    gpu_results = Path("results/gpu").resolve()
    return str(folder.relative_to(gpu_results)) if gpu_results in folder.parents else folder.name


def plot_trace(per_turn: pd.DataFrame, path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(per_turn.run))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.0), squeeze=False)
    fig.suptitle(title)
    for ax, run in zip(axes[0], runs):
        d = per_turn[per_turn.run == run]
        ax.scatter(d.ttft_s_meas * 1e3, d.ttft_s_sim * 1e3, s=10, alpha=0.7)
        lo = max(min(d.ttft_s_meas.min(), d.ttft_s_sim.min()) * 1e3 * 0.8, 1.0)
        hi = max(d.ttft_s_meas.max(), d.ttft_s_sim.max()) * 1e3 * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{run}: MAPE {d.ttft_err.abs().mean() * 100:.1f}%")
        ax.set_xlabel("measured TTFT (ms)")
        ax.set_ylabel("simulated TTFT (ms)")
    fig.tight_layout()
    return _save(fig, path)


def plot_isolated(res: pd.DataFrame, path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for (tier, overlap), d in res.groupby(["tier", "overlap"]):
        label = tier if tier in ("hbm", "recompute") else f"{tier} {'overlapped' if overlap else 'sync'}"
        ax.scatter(d.ttft_s * 1e3, d.pred_ttft_s * 1e3, s=14, label=label, alpha=0.8)
    lo, hi = res[["ttft_s", "pred_ttft_s"]].min().min() * 800, res[["ttft_s", "pred_ttft_s"]].max().max() * 1200
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured TTFT (ms)")
    ax.set_ylabel("cost model TTFT (ms)")
    ax.set_title(f"{title}\nisolated turns: MAPE {res.ttft_err.abs().mean() * 100:.1f}%", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    # the temporary file's name ends in .tmp, so savefig is told the format
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:]))
    plt.close(fig)
    return path


def validate(measured, isolated, trace, profile, out_dir, model: str = TRACE_MODEL, gpus: int = 1) -> dict:
    """Run both checks, write per-turn tables, plots and a summary JSON under `out_dir`."""
    out = Path(out_dir)
    for p, what in ((measured, "--measured"), (trace, "--trace"), (profile, "--profile")):
        if not Path(p).is_file():
            raise KvsimError(f"{p}: {what}: file not found")
    meas = pd.read_csv(measured)
    per_turn, summary = compare_trace(meas, trace, profile, model, gpus)
    _write_csv(per_turn, out / "validation_trace_turns.csv")
    plot_trace(per_turn, out / "validation_trace_scatter.png",
               plot_title(device_run_name(measured), profile, [model if gpus == 1 else f"{model} TP {gpus}"]))
    result = {"trace": summary}
    if isolated is not None:
        if not Path(isolated).is_file():
            raise KvsimError(f"{isolated}: --isolated: file not found")
        iso = pd.read_csv(isolated)
        res = predict_isolated(iso, profile)
        _write_csv(res, out / "validation_isolated.csv")
        plot_isolated(res, out / "validation_isolated_scatter.png",
                      plot_title(device_run_name(isolated), profile, iso.model))
        by = res.groupby(["model", "tier", "overlap"]).ttft_err.apply(lambda e: float(e.abs().mean()))
        result["isolated"] = {"ttft_mape": float(res.ttft_err.abs().mean()),
                              "ttft_mape_by_tier": {f"{m}/{t}/{'overlap' if o else 'sync'}": v
                                                    for (m, t, o), v in by.items()},
                              **isolated_figures(iso, profile)}
    atomic_write_text(out / "validation_summary.json", json.dumps(result, indent=1))
    return result


def _write_csv(df, path):
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
