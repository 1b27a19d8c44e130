"""The serving loop's host time priced from a served run instead of the CPU replay, checked across two calls.

For each ordered pair of batched run folders (SRC, DST): DST's calibrated profile with `iteration.host_step_ms`
reduced from SRC's served steps (`gpu.calibrate.host_step_from_served`) prices DST's runs, beside DST's own
profile (host time from the CPU replay). SRC and DST are different calls (machines, models, trace slices), so
nothing of DST's runs enters the table that prices them.

    PYTHONPATH=. python bench/gpu_host_step_cross.py --out /tmp/cross \\
        results/gpu/run31_batched_ssd_fresh:llama3.1-8b results/gpu/run32_batched_llama2_7b:llama2-7b

Writes OUT/<dst>_from_<src>/ (the profile, compare.json, scatter plots) and prints the batched table.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu.batched_validate import csv_path  # noqa: E402
from gpu.calibrate import host_step_from_served  # noqa: E402
from gpu_batched_validate import with_host_step  # noqa: E402  (bench/ is this script's folder)


def served_profile(src: Path, dst: Path, model: str, out: Path) -> Path:
    steps = csv_path(src, "steps.csv")
    if not steps.exists():
        raise SystemExit(f"{src}: no steps.csv(.gz): not a batched run folder")
    table = host_step_from_served(pd.read_csv(steps, low_memory=False))
    if table is None:
        raise SystemExit(f"{steps}: no bin of scheduled requests with 3 steps to reduce")
    prof_path = dst / "profile_calibrated.yaml"
    if not prof_path.exists():
        raise SystemExit(f"{dst}: no profile_calibrated.yaml")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{dst.name} priced with {src.name}'s served host time: {table}")
    return with_host_step(prof_path, model, table, out / "profile_served_host.yaml",
                          note=f"host_step_ms from {steps} (bench/gpu_host_step_cross.py)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("folders", nargs=2, help="FOLDER:MODEL, two batched run folders and their models")
    a = ap.parse_args()
    pairs = []
    for f in a.folders:
        folder, _, model = f.partition(":")
        if not model:
            raise SystemExit(f"{f}: expected FOLDER:MODEL (e.g. results/gpu/run31_batched_ssd_fresh:llama3.1-8b)")
        pairs.append((Path(folder), model))
    outs = []
    for (src, _), (dst, model) in ((pairs[0], pairs[1]), (pairs[1], pairs[0])):
        out = Path(a.out) / f"{dst.name}_from_{src.name}"
        prof = served_profile(src, dst, model, out)
        subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_batched_validate.py")), "--model", model,
                        "--compare", str(dst), "--out", str(out), "--profile",
                        f"calibrated={dst / 'profile_calibrated.yaml'},served={prof}"],
                       check=True, stdout=subprocess.DEVNULL)
        outs.append(out)
    from gpu_batched_table import table
    print(table(outs))


if __name__ == "__main__":
    main()
