"""The tensor-parallel executor's device script (gpu/tp_executor.py, bench/gpu_tp_serve.py) on CPU.

Pure helpers against hand-made inputs; the whole call end to end on 2 gloo processes with a tiny GQA
shape (--smoke), its files read back by the CPU validation that the device run's files will go through.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from gpu.executor import TraceBounds
from gpu.tp_executor import calibration_grid, slice_trace, slowest_links, slowest_rank
from sim.costmodel import load_profile

ROOT = Path(__file__).resolve().parents[1]


def _trace():
    rows = []
    for i, (sid, arr) in enumerate((("b", 2.0), ("a", 0.5), ("c", 1.0))):
        for k in range(2):
            rows.append({"session_id": sid, "turn": k, "arrival_s": arr if k == 0 else float("nan"),
                         "think_s": float("nan") if k == 0 else 0.2, "prompt_tokens": 100 * (i + 1),
                         "output_tokens": 40 if k else 8})
    return pd.DataFrame(rows)


def test_slice_keeps_the_first_sessions_to_arrive_and_caps_replies():
    t = slice_trace(_trace(), 2, 16)
    assert sorted(t.session_id.unique()) == ["a", "c"]          # first arrivals 0.5 and 1.0, not b's 2.0
    assert list(t.output_tokens) == [8, 16, 8, 16]              # 40 capped at 16, 8 kept
    assert len(t) == 4


def test_calibration_grid_covers_the_slices_shapes_and_one_column_past():
    # one session: prompts 100 + 300, replies 16 + 16 -> capacity 433 tokens, max_ctx 441, max_new 324
    t = pd.DataFrame({"session_id": ["s", "s"], "turn": [0, 1], "prompt_tokens": [100, 300],
                      "output_tokens": [16, 16]})
    b = TraceBounds.of(t)
    assert (b.max_ctx, b.max_new) == (441, 324)
    g = calibration_grid(b, ("dram_overlap",))
    # a DRAM turn prefills at most 324 new tokens: buckets up to 384; keys up to 441 + 256 = 697: 0..512 and 1024
    assert g["prefill_new"] == [16, 32, 64, 128, 256, 384]
    assert g["prefill_hist"] == [0, 256, 512, 1024]
    assert g["decode_batch"] == [1] and g["decode_ctx"] == [256, 512, 1024]
    # recompute prefills a whole context (441): buckets up to 512
    assert calibration_grid(b, ("dram_overlap", "recompute"))["prefill_new"][-1] == 512


def test_rank_tables_reduce_to_the_slowest_rank_per_point():
    def part(ms00, ms01, head):
        return {"decode": {"rows": [{"batch": 1, "context_tokens": 256, "ms": ms00},
                                    {"batch": 1, "context_tokens": 512, "ms": ms01}],
                           "head": [{"batch": 1, "ms": head}], "batch": [1], "context_tokens": [256, 512]}}
    got = slowest_rank([part(1.0, 2.5, 0.3), part(1.2, 2.0, 0.2)], "decode", ("batch", "context_tokens"))
    assert [r["ms"] for r in got["rows"]] == [1.2, 2.5]
    assert got["head"] == [{"batch": 1, "ms": 0.3}]
    links = slowest_links([{"h2d_pinned": [{"chunk_bytes": 4096, "gbps": 9.0}]},
                           {"h2d_pinned": [{"chunk_bytes": 4096, "gbps": 7.0}]}])
    assert links == {"h2d_pinned": [{"chunk_bytes": 4096, "gbps": 7.0}]}


def test_smoke_run_writes_a_tp_profile_and_runs_that_the_validation_reads(tmp_path):
    # the device call's own script, in its CPU mode
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu_run17_tp4.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=500, env={**os.environ, "OUT": str(out)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (out / "log.txt").read_text()
    for rank in (0, 1):
        assert f"[rank {rank}" in log and "groups up" in log
    prof = load_profile(out / "profile_tp2.yaml")
    assert prof.tp == 2 and list(prof.models) == ["llama3.1-70b"]
    # the decode table comes from whole steps of the served model, the prefill's from several passes
    raw = json.loads((out / "calibration_raw.json").read_text())["models"]["llama3.1-70b"]
    assert all(r["steps"] == 4 for r in raw["decode"]["rows"])
    assert all(r["passes"] >= 1 for r in raw["prefill"]["rows"])
    # queued turns served back to back with the ranks agreeing: the host time before a session's next turn
    gaps = raw["served_gaps"]["rows"]
    assert sum(g["continues"] for g in gaps) == 4 and len(gaps) == 6
    assert prof.models["llama3.1-70b"].host_next_turn_ms > 0
    # replies decoded right after prefills of two lengths: the decode-after-prefill term's table
    probes = raw["decode_probes"]["rows"]
    assert sorted(p["prompt_tokens"] for p in probes) == [16, 32] and all(p["output_tokens"] == 4 for p in probes)
    assert prof.models["llama3.1-70b"].decode_after_prefill_ms is not None
    # the all-reduce table at the world's TP degree, in the schema sim/collectives.py reads
    assert list(yaml.safe_load((out / "allreduce_h100.yaml").read_text())["tp"]) == [2]
    runs = pd.read_csv(out / "trace_runs.csv")
    served = pd.read_parquet(out / "trace_tp.parquet")
    assert sorted(runs.run.unique()) == ["dram_overlap", "recompute"]
    assert (runs.groupby("run").size() == len(served)).all()
    assert (runs.ttft_s > 0).all() and (runs.output_tokens <= 3).all()
    v = subprocess.run([sys.executable, "-m", "sim.cli", "gpu", "validate", "--measured", str(out / "trace_runs.csv"),
                        "--trace", str(out / "trace_tp.parquet"), "--profile", str(out / "profile_tp2.yaml"),
                        "--isolated", "none", "--model", "llama3.1-70b", "--gpus", "2", "--out", str(tmp_path / "v")],
                       cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert v.returncode == 0, v.stderr
    summary = json.loads((tmp_path / "v" / "validation_summary.json").read_text())["trace"]
    assert summary["dram_overlap"]["turns"] == len(served)


def test_h200_calibration_script_accepts_the_gqa_model_and_runs_its_grids_on_cpu(tmp_path):
    r = subprocess.run(["bash", "bench/gpu_run15_h200.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "log.txt").read_text()
    # llama3.1-8b is a model the calibration takes: the command gets as far as asking for a GPU
    assert "kvsim gpu calibrate: no CUDA device visible" in log and "--models" not in log
    assert "gqa grids: 4 prefill points, 2 decode points" in log


def test_tp2_script_serves_the_model_it_names_and_its_profile_carries_it(tmp_path):
    # run 20's script (Qwen2.5-32B at TP 2 on the device) in its CPU mode: the profile is keyed by the
    # model the validation simulates, so `kvsim gpu validate --model qwen2.5-32b --gpus 2` finds its tables
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu_run20_tp2.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=500, env={**os.environ, "OUT": str(out)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    prof = load_profile(out / "profile_tp2.yaml")
    assert prof.tp == 2 and list(prof.models) == ["qwen2.5-32b"]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "log.txt", "env.json", "allreduce.csv", "allreduce_h100.yaml", "profile_tp2.yaml", "calibration_raw.json",
        "trace_tp.parquet", "trace_runs.csv"])     # the device tool brings back 8 files at most
