"""Sweeps end to end on the real simulator with a tiny fixture trace: points, resume, failures, Ray."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.config import config_to_dict, load_config
from sim.errors import KvsimError
from sim.sweep import config_key, expand_points, load_sweep_spec, read_points, run_sweep


def _write_trace(path: Path, n_sessions: int, seed: int = 0) -> Path:
    """A small multi-turn trace in the canonical schema (sessions 2 s apart, exponential think times)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        for t in range(int(rng.integers(1, 6))):
            rows.append({"session_id": f"s{s}", "turn": t, "arrival_s": 2.0 * s if t == 0 else None,
                         "think_s": None if t == 0 else float(rng.exponential(20.0)),
                         "prompt_tokens": int(rng.integers(20, 400)), "output_tokens": int(rng.integers(20, 300))})
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _setup(tmp_path: Path, spec: dict, n_sessions: int = 20) -> Path:
    _write_trace(tmp_path / "trace.parquet", n_sessions)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": "llama2-7b", "gpu": {"name": "a100-80gb", "count": 1},
        "host": {"dram_bytes": "8GB"}, "ssd": {"bytes": "100GB"}, "workload": {"trace": "trace.parquet"}}))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", "out": str(tmp_path / "out"), **spec}))
    return path


def test_spec_expands_variants_grid_zip_and_seeds_in_order(tmp_path):
    spec = load_sweep_spec(_setup(tmp_path, {
        "variants": {"full": {}, "no_preload": {"policy.layerwise_preload": False}},
        "grid": {"host.dram_bytes": ["4GB", "16GB"], "policy.kind": ["recompute", "attentionstore"]},
        "zip": {"scheduler.max_batch": [8, 16], "scheduler.lookahead_jobs": [4, 8]}, "seeds": [0, 1]}))
    points = expand_points(spec)
    assert len(points) == 2 * 4 * 2 * 2
    assert [p.index for p in points] == list(range(32))
    first = points[0]
    assert first.variant == "full" and first.seed == 0
    assert first.overrides == {"host.dram_bytes": "4GB", "policy.kind": "recompute", "scheduler.max_batch": 8,
                               "scheduler.lookahead_jobs": 4, "seed": 0}
    assert points[1].overrides["seed"] == 1 and points[2].overrides["scheduler.max_batch"] == 16
    assert points[16].overrides["policy.layerwise_preload"] is False


@pytest.mark.parametrize("bad, match", [
    ({"grid": {"host.dram_bytes": []}}, "grid.host.dram_bytes: expected a non-empty list"),
    ({"zip": {"seed": [1, 2], "gpu.count": [1]}}, "zip: expected lists of one length"),
    ({"grid": {"seed": [1]}, "zip": {"seed": [2]}}, "zip.seed: key is also a grid axis"),
    ({"seeds": "0"}, "seeds: expected a non-empty list of integers"),
    ({"colour": "red"}, "colour: unknown key"),
])
def test_bad_spec_names_file_and_key(tmp_path, bad, match):
    with pytest.raises(KvsimError, match=match) as err:
        load_sweep_spec(_setup(tmp_path, bad))
    assert "spec.yaml" in str(err.value)


def test_tiny_sweep_writes_one_row_per_point_and_each_points_turns(tmp_path):
    spec = load_sweep_spec(_setup(tmp_path, {"overrides": {"workload.session_rate_per_s": 0.5},
                                              "grid": {"host.dram_bytes": ["1GB", "64GB"],
                                                       "policy.kind": ["recompute", "attentionstore"]},
                                              "seeds": [0, 1]}))
    res = run_sweep(spec, jobs=2, progress=False)
    table = read_points(tmp_path / "out")
    assert (res.total, res.ran, res.skipped, res.failed) == (8, 8, 0, 0)
    assert len(table) == 8 and set(table["status"]) == {"ok"}
    assert table["host.dram_bytes"].tolist()[:4] == [1e9] * 4  # resolved bytes, not the spec's "1GB"
    for _, row in table.iterrows():
        cfg = config_to_dict(load_config(tmp_path / "base.yaml", {"workload.session_rate_per_s": 0.5,
                                                                  "host.dram_bytes": row["host.dram_bytes"],
                                                                  "policy.kind": row["policy.kind"],
                                                                  "seed": int(row["seed"])}))
        assert row["key"] == config_key(cfg)  # keyed by the resolved config
        turns = pd.read_parquet(tmp_path / "out" / "points" / row["key"] / "turns.parquet")
        assert len(turns) == row["turns"] > 0
    # the simulator's own behaviour shows through: a big store beats recompute on TTFT
    big = table[table["host.dram_bytes"] == 64e9].set_index(["policy.kind", "seed"])["ttft_mean_s"]
    assert (big["attentionstore"] < big["recompute"]).all()
    # the seeds redraw the Poisson arrivals, so the two replications of a configuration differ
    assert big[("attentionstore", 0)] != big[("attentionstore", 1)]


def test_two_spellings_of_one_config_run_once(tmp_path):
    spec = load_sweep_spec(_setup(tmp_path, {"grid": {"host.dram_bytes": ["2GB", 2e9, "2000MB"]}}))
    res = run_sweep(spec, jobs=1, progress=False)
    assert res.total == 3 and res.ran == 1 and res.table["key"].nunique() == 1


def test_failing_points_are_recorded_while_the_rest_go_on(tmp_path):
    # llama2-70b does not fit one A100: a valid config that fails inside the run
    spec_path = _setup(tmp_path, {"grid": {"model": ["llama2-7b", "llama2-70b"], "policy.eviction": ["lru", "fifo"]}})
    res = run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)
    t = res.table.set_index(["model", "policy.eviction"])
    assert t.loc[("llama2-7b", "lru"), "status"] == "ok"
    assert t.loc[("llama2-70b", "lru"), "status"] == "error"
    assert "leave no HBM for KV" in t.loc[("llama2-70b", "lru"), "error"]
    assert res.failed == 2
    rec = json.loads((tmp_path / "out" / "points" / t.loc[("llama2-70b", "lru"), "key"] / "point.json").read_text())
    assert rec["status"] == "error" and "Traceback" in rec["traceback"]
    # a resume does not rerun the recorded failure unless asked to
    assert run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False).ran == 0
    assert run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False, retry_failed=True).ran == 2
    # the CLI reports the failures and exits 1 (not 2: the spec itself was fine)
    assert main(["sweep", str(spec_path), "--no-progress", "--jobs", "1"]) == 1


def test_resume_after_a_killed_run_loses_nothing(tmp_path):
    spec_path = _setup(tmp_path, {"grid": {"host.dram_bytes": [f"{g}GB" for g in range(1, 13)],
                                            "policy.eviction": ["lru", "fifo"]}}, n_sessions=150)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # this checkout's sim/
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "sweep", str(spec_path), "--jobs", "1", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("points/*/point.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("points/*/point.json")}
    assert 3 <= len(done) < 24, "the run must be killed part-way for this test to mean anything"

    res = run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)
    assert (res.skipped, res.ran, res.failed) == (len(done), 24 - len(done), 0)
    assert all((out / "points" / k / "point.json").stat().st_mtime_ns == m for k, m in done.items())
    table = read_points(out)
    assert len(table) == 24 and set(table["status"]) == {"ok"} and table["turns"].min() > 0
    assert read_points(out)["key"].is_unique


def test_cli_sweep_with_a_bad_spec_prints_one_line_and_exits_2(tmp_path, capsys):
    spec_path = _setup(tmp_path, {"grid": {"host.dram_bytes": "8GB"}})
    assert main(["sweep", str(spec_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "grid.host.dram_bytes" in err


def test_sweep_runs_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray")
    spec = load_sweep_spec(_setup(tmp_path, {"grid": {"policy.kind": ["recompute", "attentionstore"]}}))
    try:
        res = run_sweep(spec, ray_address="local", jobs=2, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (res.ran, res.failed) == (2, 0)
    assert set(read_points(tmp_path / "out")["status"]) == {"ok"}


def test_unreachable_ray_address_is_a_one_line_user_error(tmp_path, capsys):
    spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}})
    assert main(["sweep", str(spec_path), "--ray", "127.0.0.1:1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--ray 127.0.0.1:1" in err


def test_manifest_records_spec_and_base_relative_to_the_working_directory(tmp_path, monkeypatch):
    spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}})
    monkeypatch.chdir(tmp_path)
    run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert (manifest["spec"], manifest["base"]) == ("spec.yaml", "base.yaml")


# ---------------------------------------------------------------- checked before any point runs

def test_a_spec_of_a_hundred_million_points_is_refused_at_once(tmp_path):
    # 8 axes of 10 values: 10^8 points, refused from the lengths alone (expanding them takes minutes and GBs)
    grid = {f"scheduler.{k}": list(range(1, 11)) for k in ("max_batch", "max_prefill_tokens", "lookahead_jobs")}
    grid.update({"host.dram_bytes": [f"{g}GB" for g in range(1, 11)], "ssd.bytes": [f"{g}GB" for g in range(1, 11)],
                 "gpu.count": list(range(1, 11)), "workload.max_sessions": list(range(1, 11)),
                 "host.h2d_gbps": list(range(1, 11))})
    t0 = time.perf_counter()
    with pytest.raises(KvsimError, match=r"spec.yaml: grid: 100,000,000 points .*expected at most 10,000"):
        load_sweep_spec(_setup(tmp_path, {"grid": grid}))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("grid, match", [
    ({"policy.eviction": ["lru", "bogus"]}, "grid.policy.eviction: expected one of scheduler_aware, lru, fifo, got 'bogus'"),
    ({"policy.evicton": ["lru"]}, "grid.policy.evicton: unknown key"),
    ({"host.dram_bytes": ["8GB", "lots"]}, "grid.host.dram_bytes: expected a byte size"),
])
def test_an_invalid_axis_value_stops_the_sweep_before_any_point_runs(tmp_path, capsys, grid, match):
    spec_path = _setup(tmp_path, {"grid": grid})
    assert main(["sweep", str(spec_path), "--no-progress", "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"spec.yaml: {match}" in err
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_a_bad_value_in_a_variant_names_the_variant(tmp_path):
    spec_path = _setup(tmp_path, {"variants": {"full": {}, "odd": {"policy.layerwise_preload": "sometimes"}}})
    with pytest.raises(KvsimError, match=r"spec.yaml: variants.odd.policy.layerwise_preload: expected true or false"):
        run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)


def test_seeds_are_refused_where_the_seed_redraws_nothing(tmp_path):
    # the fixture trace is replayed with its own arrivals and think times: both seeds would give one run
    spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}, "seeds": [0, 1]})
    with pytest.raises(KvsimError, match=r"spec.yaml: seeds: 2 seeds, but at policy.kind=recompute the seed "
                                         r"redraws nothing.*workload.session_rate_per_s"):
        run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)
    with pytest.raises(KvsimError, match="seeds: seed 1 is listed twice"):
        load_sweep_spec(_setup(tmp_path, {"overrides": {"workload.session_rate_per_s": 0.5}, "seeds": [0, 1, 1]}))


def test_committed_sweep_specs_have_seeds_that_redraw_something():
    from sim.sweep import resolve_points, seed_redraws

    root = Path(__file__).resolve().parent.parent
    specs = sorted((root / "configs/sweeps").glob("*.yaml")) + sorted((root / "configs/paper/sweeps").glob("*.yaml"))
    assert len(specs) >= 10
    for path in specs:  # resolve_points refuses seeds that redraw nothing
        resolved = resolve_points(load_sweep_spec(path))
        if len({rp.point.seed for rp in resolved}) > 1:
            assert all(seed_redraws(rp.config) for rp in resolved), path


@pytest.mark.parametrize("where", ["flag", "spec"])
def test_out_naming_a_file_is_one_line_and_exit_2_before_any_point_runs(tmp_path, capsys, where):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    if where == "flag":
        spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}})
        argv = ["sweep", str(spec_path), "--out", str(blocker), "--no-progress"]
    else:  # a parent of the spec's out is a file
        spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}})
        spec = yaml.safe_load(spec_path.read_text())
        spec_path.write_text(yaml.safe_dump({**spec, "out": str(blocker / "sub")}))
        argv = ["sweep", str(spec_path), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "results.txt" in err
    assert ("exists and is not a folder" in err) if where == "flag" else ("is a file, not a folder" in err)
    assert blocker.read_text() == "not a folder"


def test_a_truncated_run_log_line_is_dropped_on_resume_and_named_by_the_report_reader(tmp_path):
    from sim.sweep import read_run_log

    spec_path = _setup(tmp_path, {"grid": {"policy.kind": ["recompute"]}})
    run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)
    log = tmp_path / "out" / "runs.jsonl"
    log.write_text(log.read_text() + '{"finished_at": "2026-01-01T00:00:00Z", "wall_s": 1.2')  # a copy cut short
    with pytest.raises(KvsimError, match=r"runs.jsonl: line 2: expected one JSON record per line"):
        read_run_log(tmp_path / "out")
    run_sweep(load_sweep_spec(spec_path), jobs=1, progress=False)  # resume: appends its own record
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)
    assert [r["ran"] for r in read_run_log(tmp_path / "out")] == [1, 0]


def test_point_keys_are_the_same_for_two_checkouts_in_different_folders(tmp_path):
    from sim.sweep import resolve_points

    keys = []
    for folder in ("checkout_a", "deeper/checkout_b"):
        root = tmp_path / folder
        root.mkdir(parents=True)
        keys.append([rp.key for rp in resolve_points(load_sweep_spec(
            _setup(root, {"grid": {"host.dram_bytes": ["4GB", "16GB"]}})))])
    assert keys[0] == keys[1] and len(set(keys[0])) == 2
    # the trace enters the key by its content: a different trace at the same path is a different point
    _write_trace(tmp_path / "checkout_a" / "trace.parquet", 20, seed=1)
    moved = [rp.key for rp in resolve_points(load_sweep_spec(tmp_path / "checkout_a" / "spec.yaml"))]
    assert set(moved).isdisjoint(keys[0])
