"""How closely the real executor repeats itself: the floor under any simulator's per-turn errors.

Two runs of one call serve the same sessions with the same scheduler and make the same decisions when the
DRAM run never loads a history back (HBM holds every session: `dram_rX` is `hbm_rX` plus asynchronous saves).
Compared turn by turn as if one were the other's prediction (`gpu.batched_validate.compare_turns`), they give
the run-to-run spread of per-turn TTFT, per-request TPOT, mean and p99 TTFT and throughput on the same GPU,
minutes apart: a target tighter than that cannot be met by a simulator, which sees neither run's clock.

    PYTHONPATH=. python bench/gpu_repeat_floor.py results/gpu/run33_batched_host_calib [more folders]

`--across A B`: the same run names of two calls that served the same sessions (identical traces.csv) on two
machines, turn by turn: how closely two H100s running the same code repeat each other, preemptions included.

    PYTHONPATH=. python bench/gpu_repeat_floor.py --across results/gpu/run31_batched_ssd_fresh results/gpu/run33_batched_host_calib
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu.batched_validate import compare_turns, csv_path  # noqa: E402


def repeat_pairs(turns: pd.DataFrame, steps: pd.DataFrame) -> list[dict]:
    """Per load, the summary of `dram_rX` against `hbm_rX` (both directions' TTFT MAPE averaged, as neither is
    the reference) where the DRAM run loaded nothing back (`steps.ext_tokens` all 0)."""
    out = []
    for name in turns.run.unique():
        if not name.startswith("hbm_r") or name.endswith(("_preempt", "_loadfirst")):
            continue
        twin = "dram_" + name[len("hbm_"):]
        d_steps = steps[steps.run == twin]
        if twin not in set(turns.run) or not len(d_steps) or (d_steps.ext_tokens > 0).any():
            continue
        out.append({"pair": f"{twin} vs {name}", **_both_ways(turns[turns.run == name], turns[turns.run == twin])})
    return out


def _both_ways(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    _, ab = compare_turns(a, b)
    _, ba = compare_turns(b, a)
    return {"turns": ab["turns_matched"], "ttft_mape": (ab["ttft_mape"] + ba["ttft_mape"]) / 2,
            "tpot_mape": (ab["tpot_mape"] + ba["tpot_mape"]) / 2, "ttft_mean_diff": ab["ttft_mean_err"],
            "ttft_p99_diff": ab["ttft_p99_err"], "throughput_diff": ab["throughput_err"]}


def across_pairs(turns_a: pd.DataFrame, turns_b: pd.DataFrame) -> list[dict]:
    """Per run name served in both calls: B's turns against A's (TTFT and TPOT MAPE averaged over both
    directions) and each call's preemptions."""
    out = []
    for name in turns_a.run.unique():
        a, b = turns_a[turns_a.run == name], turns_b[turns_b.run == name]
        if len(b):
            out.append({"run": name, **_both_ways(a, b), "preemptions": (int(a.preemptions.sum()),
                                                                          int(b.preemptions.sum()))})
    return out


def across_table(fa, fb) -> str:
    fa, fb = Path(fa), Path(fb)
    ta, tb = (pd.read_csv(f / "traces.csv") for f in (fa, fb))
    if not ta.equals(tb):
        raise SystemExit(f"{fb / 'traces.csv'}: not the sessions of {fa / 'traces.csv'}: --across compares one trace "
                         f"served twice")
    lines = [f"| run | turns | TTFT MAPE | TPOT MAPE | mean TTFT diff | p99 TTFT diff | throughput diff | preemptions in turn records "
             f"({fa.name} / {fb.name}) |", "|---|---|---|---|---|---|---|---|"]
    for r in across_pairs(pd.read_csv(csv_path(fa, "turns.csv")), pd.read_csv(csv_path(fb, "turns.csv"))):
        lines.append(f"| {r['run']} | {r['turns']} | {100 * r['ttft_mape']:.1f}% | {100 * r['tpot_mape']:.1f}% | "
                     f"{100 * r['ttft_mean_diff']:+.1f}% | {100 * r['ttft_p99_diff']:+.1f}% | "
                     f"{100 * r['throughput_diff']:+.1f}% | {r['preemptions'][0]} / {r['preemptions'][1]} |")
    return "\n".join(lines)


def table(folders) -> str:
    lines = ["| folder | pair | turns | TTFT MAPE | TPOT MAPE | mean TTFT diff | p99 TTFT diff | throughput diff |",
             "|---|---|---|---|---|---|---|---|"]
    for f in folders:
        f = Path(f)
        turns = pd.read_csv(csv_path(f, "turns.csv"))
        steps = pd.read_csv(csv_path(f, "steps.csv"), low_memory=False)
        for r in repeat_pairs(turns, steps):
            lines.append(f"| {f.name} | {r['pair']} | {r['turns']} | {100 * r['ttft_mape']:.1f}% | "
                         f"{100 * r['tpot_mape']:.1f}% | {100 * r['ttft_mean_diff']:+.1f}% | "
                         f"{100 * r['ttft_p99_diff']:+.1f}% | {100 * r['throughput_diff']:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    across = args[:1] == ["--across"]
    if across:
        args = args[1:]
    if len(args) < 1 or (across and len(args) != 2):
        raise SystemExit("usage: gpu_repeat_floor.py RUN_FOLDER [RUN_FOLDER ...] | --across RUN_FOLDER RUN_FOLDER")
    for f in args:
        if not Path(f).is_dir():
            raise SystemExit(f"{f}: not a folder")
        if not csv_path(Path(f), "turns.csv").exists():
            raise SystemExit(f"{f}: no turns.csv(.gz): not a batched run folder")
    print(across_table(*args) if across else table(args))
