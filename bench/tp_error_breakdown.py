"""Where a trace validation's TTFT error comes from: per run, the measured and simulated service time
of every turn split into prefill (start -> first token) and decode (first token -> end), with the
simulator replaying the measured arrivals exactly as `kvsim gpu validate` does (gpu.validate).

    PYTHONPATH=. python bench/tp_error_breakdown.py results/gpu/run17_tp4 [--model llama3.1-70b --gpus 4]
        [--profile PROFILE]

Reads DIR/trace_runs.csv, DIR/trace_tp.parquet and DIR/profile_tp<gpus>.yaml (or PROFILE); prints one table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from gpu.validate import realized_trace, simulate_run


def breakdown(folder, model: str = "llama3.1-70b", gpus: int = 4, profile=None) -> pd.DataFrame:
    d = Path(folder)
    profile = profile or d / f"profile_tp{gpus}.yaml"
    meas = pd.read_csv(d / "trace_runs.csv")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvsim_breakdown_") as tmp:
        for run, m in meas.groupby("run", sort=False):
            m = m.assign(session_id=m.session_id.astype(str))
            tr = realized_trace(d / "trace_tp.parquet", m, Path(tmp) / f"{run}.parquet")
            s = simulate_run(run, tr, profile, model=model, gpus=gpus)
            j = m.merge(s.assign(session_id=s.session_id.astype(str)), on=["session_id", "turn"],
                        suffixes=("_m", "_s"))
            pre_m, pre_s = (j.first_token_s - j.start_s) * 1e3, j.prefill_s * 1e3
            dec_m, dec_s = (j.end_s - j.first_token_s) * 1e3, j.decode_s * 1e3
            steps = (j.output_tokens_m - 1).clip(lower=1)
            by_start = j.sort_values("start_s")
            gaps = (by_start.start_s - by_start.end_s.shift(1)) * 1e3
            queued = by_start.queue_s_m > 0.005
            # after a turn whose session goes on, the ranks agree on its end (host_next_turn_ms)
            prev_goes_on = (by_start.turn < by_start.groupby("session_id").turn.transform("max")).shift(1, fill_value=False)
            rows.append({"run": run, "turns": len(j),
                         "prefill_meas_ms": pre_m.sum(), "prefill_sim_ms": pre_s.sum(),
                         "prefill_mean_err": float(((pre_s - pre_m) / pre_m).mean()),
                         "decode_step_meas_ms": float((dec_m / steps).mean()),
                         "decode_step_sim_ms": float((dec_s / steps).mean()),
                         "decode_err": float(dec_s.sum() / dec_m.sum() - 1),
                         "service_err": float((pre_s + dec_s).sum() / (pre_m + dec_m).sum() - 1),
                         "host_gaps_queued_ms": float(gaps[queued].sum()),
                         "gap_after_going_on_ms": float(gaps[queued & prev_goes_on].median()),
                         "gap_after_last_ms": float(gaps[queued & ~prev_goes_on].median()),
                         "utilisation_meas": float((j.end_s - j.start_s).sum() / (j.end_s.max() - j.arrival_s_m.min())),
                         "queue_mean_meas_ms": float(j.queue_s_m.mean() * 1e3),
                         "queue_mean_sim_ms": float(j.queue_s_s.mean() * 1e3)})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--model", default="llama3.1-70b")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--profile", default=None, help="default: FOLDER/profile_tp<gpus>.yaml")
    a = ap.parse_args(argv)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(breakdown(a.folder, a.model, a.gpus, a.profile).round(4).T.to_string())


if __name__ == "__main__":
    main()
