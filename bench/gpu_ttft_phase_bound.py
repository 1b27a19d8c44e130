"""How much per-turn TTFT MAPE a batched validation carries from the arrival phase alone: a turn that arrives
while a step is in flight waits for that step's end, and the measured run and the simulator each place the
arrival at an independent, uniform point of their own step in flight. Two independent uniform phases over
a step of mean length S differ by S / 3 on average, so a turn of TTFT t carries ~S / (3 t) of relative error
however exact the step costs are. Per run: the mean step, the mean TTFT, that bound's mean over turns, and
the MAPE the comparison measured (compare.json, the calibrated profile).

    PYTHONPATH=. python bench/gpu_ttft_phase_bound.py results/gpu/run26_batched_top8 results/gpu/run29_tp4_batched_h200
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu.batched_validate import csv_path  # noqa: E402


def bound(folder: Path) -> pd.DataFrame:
    steps = pd.read_csv(csv_path(folder, "steps.csv"), low_memory=False)
    turns = pd.read_csv(csv_path(folder, "turns.csv"))
    runs = json.loads((folder / "compare.json").read_text())["calibrated"]["runs"]
    rows = []
    for run, g in turns.groupby("run", sort=False):
        step_s = steps[steps.run == run].wall_ms.mean() / 1e3
        ttft = (g.first_token_s - g.arrival_s).dropna()
        ttft = ttft[ttft > 0]
        rows.append({"folder": folder.name, "run": run, "mean_step_ms": step_s * 1e3,
                     "ttft_median_ms": ttft.median() * 1e3, "phase_only_mape": float((step_s / 3 / ttft).mean()),
                     "measured_mape": runs[run]["ttft_mape"] if run in runs else float("nan")})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: gpu_ttft_phase_bound.py RUN_FOLDER [RUN_FOLDER ...]")
    for f in sys.argv[1:]:
        for name in ("compare.json", "turns.csv"):
            if not (Path(f) / name).is_file():
                raise SystemExit(f"{f}: no {name} (expected a batched run folder)")
    df = pd.concat([bound(Path(f)) for f in sys.argv[1:]], ignore_index=True)
    print(df.round(3).to_string(index=False))
