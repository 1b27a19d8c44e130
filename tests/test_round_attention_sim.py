"""`kvsim roundattn simulate`: the simulator's Round Attention option fed from the measurement file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpu.roundattn.simulate import measured_round_attention
from sim.errors import KvsimError

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "configs/round_attention/smollm2_measured.yaml"


def _kvsim(*args, cwd=None):
    """`kvsim` of this checkout (PYTHONPATH: from another folder, `python -m sim.cli` would import the
    installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def _params(tmp_path, watershed_layer=6, n_layers=24, kept=0.5, by_variant=None):
    doc = {"policy": {"round_attention": {"enabled": True, "watershed_layer": watershed_layer, "kept_fraction": kept}},
           "measured": {"model": "m", "n_layers": n_layers, "watershed_depth_fraction": watershed_layer / n_layers,
                        "variant": "top_dyn90", "kept_fraction_by_variant": by_variant or {"top1": 0.2}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_parameters_come_from_the_measurement_file_and_keep_the_depth_fraction_on_other_models(tmp_path):
    doc = yaml.safe_load(COMMITTED.read_text())
    ra, meas = doc["policy"]["round_attention"], doc["measured"]
    same, how = measured_round_attention(COMMITTED, meas["n_layers"])
    assert same == {"enabled": True, "watershed_layer": ra["watershed_layer"], "kept_fraction": ra["kept_fraction"]}
    assert "as measured" in how
    deeper, how = measured_round_attention(COMMITTED, 40)
    assert deeper["watershed_layer"] == round(meas["watershed_depth_fraction"] * 40)
    assert "extrapolated" in how
    p = _params(tmp_path)
    assert measured_round_attention(p, 24, "top1")[0]["kept_fraction"] == 0.2
    with pytest.raises(KvsimError, match=r"measured\.kept_fraction_by_variant\.top9: missing"):
        measured_round_attention(p, 24, "top9")


def test_simulate_shrinks_bytes_loaded_by_the_measured_factor(tmp_path):
    # llama2-7b has 32 layers: watershed 6 of 24 -> 8 of 32; above it half the history is loaded
    params = _params(tmp_path, watershed_layer=6, n_layers=24, kept=0.5)
    out = tmp_path / "out"
    p = _kvsim("roundattn", "simulate", str(ROOT / "configs/default.yaml"), "--params", str(params),
               "--set", "model=llama2-7b", "--set", "workload.max_sessions=20", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "comparison.json").read_text())
    assert res["round_attention"] == {"enabled": True, "watershed_layer": 8, "kept_fraction": 0.5}
    without, with_ra = res["without"], res["with"]
    assert without["bytes_loaded"] > 0 and with_ra["bytes_h2d"] == with_ra["bytes_loaded"]
    assert with_ra["bytes_loaded"] == pytest.approx(without["bytes_loaded"] * (8 + 24 * 0.5) / 32)
    assert with_ra["peak_hbm_bytes"] < without["peak_hbm_bytes"]
    assert (out / "with" / "summary.json").exists()
    # the one summary table, a column per run, then the change Round Attention makes
    lines = p.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("without"))
    assert header.split() == ["without", "with", "round", "attention"]
    drop = 100 * (with_ra["bytes_h2d"] / without["bytes_h2d"] - 1)
    assert f"change with round attention: loaded to HBM {drop:+.1f}%, peak KV in HBM" in p.stdout


def test_simulate_with_a_bad_parameters_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {round_attention: {enabled: true}}\n")
    p = _kvsim("roundattn", "simulate", str(ROOT / "configs/default.yaml"), "--params", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"kvsim: error: {bad}: measured: missing, expected the keys "
                                             "`kvsim roundattn measure` writes"]


def test_simulate_names_a_bad_override_as_the_set_flag(tmp_path):
    p = _kvsim("roundattn", "simulate", str(ROOT / "configs/default.yaml"), "--set", "workload.max_sessions=0",
               cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("kvsim: error: --set workload.max_sessions")
