"""The GPUs' SM clock, power and temperature during each phase of a TP trace call, from the call's
`nvidia-smi` log (smi.csv or smi.csv.gz, 100 ms samples) lined up with its turns (trace_runs.csv's epoch0_s):
per run, the mean clock and power during the prefills and during the decodes that follow them, by the
prefill's length; and per 5 s window of the whole call (the calibration's prefill grid included).

    PYTHONPATH=. python bench/gpu_clock_phases.py results/gpu/run27_tp4 [--gpu 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def read_smi(folder: Path) -> pd.DataFrame:
    path = folder / "smi.csv" if (folder / "smi.csv").is_file() else folder / "smi.csv.gz"
    if not path.is_file():
        raise SystemExit(f"{folder}: no smi.csv(.gz): expected the call's nvidia-smi log")
    s = pd.read_csv(path, skipinitialspace=True)
    s.columns = ["ts", "gpu", "sm_mhz", "mem_mhz", "power_w", "temp_c"]
    s["t"] = pd.to_datetime(s.ts, format="%Y/%m/%d %H:%M:%S.%f").map(lambda x: x.timestamp())
    return s


def by_turn(s: pd.DataFrame, turns: pd.DataFrame, gpu: int) -> pd.DataFrame:
    g = s[s.gpu == gpu].sort_values("t")
    rows = []
    for x in turns.itertuples():
        e = x.epoch0_s
        pre = g[(g.t >= e + x.start_s) & (g.t < e + x.first_token_s)]
        dec = g[(g.t >= e + x.first_token_s) & (g.t < e + x.end_s)]
        rows.append(dict(run=x.run, prefill_ms=(x.first_token_s - x.start_s) * 1e3,
                         prefill_sm_mhz=pre.sm_mhz.mean(), prefill_power_w=pre.power_w.mean(),
                         decode_sm_mhz=dec.sm_mhz.mean(), decode_power_w=dec.power_w.mean()))
    d = pd.DataFrame(rows)
    d["prefill"] = pd.cut(d.prefill_ms, [0, 50, 150, 1e9], labels=["< 50 ms", "50-150 ms", ">= 150 ms"])
    return (d.groupby(["run", "prefill"], observed=True)
            .agg(turns=("prefill_ms", "size"), prefill_sm_mhz=("prefill_sm_mhz", "mean"),
                 prefill_power_w=("prefill_power_w", "mean"), decode_sm_mhz=("decode_sm_mhz", "mean"),
                 decode_power_w=("decode_power_w", "mean")).round(0))


def by_window(s: pd.DataFrame, gpu: int, width_s: float = 5.0) -> pd.DataFrame:
    g = s[s.gpu == gpu].copy()
    g["window_s"] = ((g.t - s.t.min()) // width_s * width_s).astype(int)
    return g.groupby("window_s").agg(sm_mhz=("sm_mhz", "mean"), sm_min_mhz=("sm_mhz", "min"),
                                     power_w=("power_w", "mean"), temp_c=("temp_c", "max")).round(0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gpu", type=int, default=0)
    a = ap.parse_args()
    if not (a.folder / "trace_runs.csv").is_file():
        raise SystemExit(f"{a.folder}: no trace_runs.csv (expected a TP trace call's folder)")
    smi = read_smi(a.folder)
    if a.gpu not in set(smi.gpu):
        raise SystemExit(f"--gpu {a.gpu}: not in {a.folder}'s clock log (GPUs {sorted(set(smi.gpu))})")
    print(by_turn(smi, pd.read_csv(a.folder / "trace_runs.csv"), a.gpu).to_string())
    print()
    print(by_window(smi, a.gpu).T.to_string())
