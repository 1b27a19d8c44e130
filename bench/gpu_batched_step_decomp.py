"""Where a batched run's step error lives: each step that ran at a static shape against that shape's own
calibration (iteration_raw.csv), with the scheduler's host time (`host_ms`) taken out of the wall time,
and on CUDA events alone (the same graph's GPU time in the run vs in calibration).

    python bench/gpu_batched_step_decomp.py results/gpu/run23_batched_shapes

Writes step_decomp.csv in the folder (per run and kind of step) and prints it.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu.batched_validate import csv_path  # noqa: E402


def decompose(folder: Path) -> pd.DataFrame:
    s = pd.read_csv(csv_path(folder, "steps.csv"), keep_default_na=False, na_values=[""])
    raw = pd.read_csv(folder / "iteration_raw.csv", keep_default_na=False, na_values=[""])
    cal = raw[raw.key != ""].groupby("key").agg(cal_ms=("ms", "median"), cal_gpu_ms=("gpu_ms", "median"))
    j = s[s.ext_tokens == 0].merge(cal, left_on="key", right_index=True)   # host loads add their copies
    j["kind"] = np.where(j.chunk_tokens > 0, "mixed", "decode")
    run_ms = j.wall_ms - j.host_ms
    j["step_err"] = (j.cal_ms - run_ms) / run_ms
    j["gpu_err"] = (j.cal_gpu_ms - j.gpu_ms) / j.gpu_ms
    g = j.groupby(["run", "kind"], sort=False)
    cols = {}
    if "run_ms" in j:   # runs 26 on: the executor's own span (as calibration times it), its issue part, GC
        j["run_err"] = (j.cal_ms - j.run_ms) / j.run_ms
        j["after_ms"] = j.wall_ms - j.host_ms - j.run_ms        # the loop's update and records after the step
        g = j.groupby(["run", "kind"], sort=False)
        cols = {"run_bias": g.run_err.mean(), "issued_ms_median": g.issued_ms.median(),
                "run_minus_gpu_ms": g.apply(lambda x: (x.run_ms - x.gpu_ms).median()),
                "after_ms_median": g.after_ms.median(), "gc_ms_mean": g.gc_ms.mean()}
    return pd.DataFrame({"steps": g.size(), "step_mape": g.step_err.apply(lambda x: x.abs().mean()),
                         "step_bias": g.step_err.mean(), "gpu_mape": g.gpu_err.apply(lambda x: x.abs().mean()),
                         "gpu_bias": g.gpu_err.mean(), "schedule_ms_median": g.host_ms.median(), **cols}).reset_index()


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    df = decompose(folder)
    df.to_csv(folder / "step_decomp.csv", index=False, float_format="%.4f")
    print(df.round(3).to_string(index=False))
