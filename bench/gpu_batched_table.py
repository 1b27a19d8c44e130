"""Issue 15's batched-validation table from committed run folders: one row per (run folder, profile, run),
with the model, load, mean batch, TTFT MAPE, TPOT MAPE, mean and p99 TTFT error and throughput error, read from
each folder's compare.json (written by `bench/gpu_batched_validate.py`, or its --compare on the folder).

    PYTHONPATH=. python bench/gpu_batched_table.py results/gpu/run25_batched_shapes_all results/gpu/run26_batched_top8
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    d = json.loads((folder / "compare.json").read_text())
    out = []
    for prof, c in d.items():
        for name, v in c["runs"].items():
            out.append({**v, "folder": folder.name, "profile": prof, "run": name, "model": c["model"], "gpu": c["gpu"]})
    return out


def table(folders) -> str:
    pct = lambda x: f"{100 * x:.1f}%"          # noqa: E731
    sgn = lambda x: f"{100 * x:+.1f}%"         # noqa: E731
    lines = ["| folder | profile | run | model | GPU | mean batch | preempt. | TTFT MAPE | TPOT MAPE | TTFT mean err "
             "| TTFT p99 err | throughput err | TTFT MAPE, measured wait kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in folders:
        for r in rows(Path(f)):
            lines.append(f"| {r['folder']} | {r['profile']} | {r['run']} | {r['model']} | {r['gpu']} | {r['mean_batch']:.1f} "
                         f"| {r['preemptions']} | {pct(r['ttft_mape'])} | {pct(r['tpot_mape'])} "
                         f"| {sgn(r['ttft_mean_err'])} | {sgn(r['ttft_p99_err'])} | {sgn(r['throughput_err'])} "
                         f"| {pct(r['ttft_mape_same_wait'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: gpu_batched_table.py RUN_FOLDER [RUN_FOLDER ...]")
    for f in sys.argv[1:]:
        if not (Path(f) / "compare.json").is_file():
            raise SystemExit(f"{f}: no compare.json (expected a batched run folder)")
    print(table(sys.argv[1:]))
