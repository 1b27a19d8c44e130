"""Validation joins the right turns and applies the cost model's own formulas."""
import math

import pandas as pd
import pytest

from gpu.calibrate import write_profile
from gpu.validate import compare_trace, predict_isolated, simulate_run
from sim.trace import write_trace

from calibration_samples import raw_samples


@pytest.fixture
def profile(tmp_path):
    p = tmp_path / "h.yaml"
    write_profile(raw_samples(), p)
    return p


def test_isolated_prediction_is_the_preload_pipeline_by_hand(profile):
    iso = pd.DataFrame([
        # DRAM, overlapped, N=2: load per layer = 1024 tok * 16 KiB / h2d(16 MiB chunk = 40 GB/s)
        dict(model="llama2-7b", tier="dram", overlap=True, read_buffer_layers=2, new_tokens=64,
             history_tokens=1024, ttft_s=0.02),
        dict(model="llama2-7b", tier="dram", overlap=False, read_buffer_layers=2, new_tokens=64,
             history_tokens=1024, ttft_s=0.02),
        dict(model="llama2-7b", tier="recompute", overlap=True, read_buffer_layers=2, new_tokens=1088,
             history_tokens=0, ttft_s=0.02),
    ])
    res = predict_isolated(iso, profile)
    load = 1024 * 16384 / 40e9
    comp = (0.1 + 0.064 + 1e-6 * 64 * 1024) * 1e-3
    head = 0.3e-3
    L = 32
    assert res.pred_ttft_s[0] == pytest.approx(load + comp + (L - 1) * max(load, comp) + head, rel=1e-4)
    assert res.pred_ttft_s[1] == pytest.approx(L * (load + comp) + head, rel=1e-4)
    # 1088 new tokens lie past the grid's last row (512): linear extrapolation in n
    assert res.pred_ttft_s[2] == pytest.approx(L * (0.1 + 1.088) * 1e-3 + head, rel=1e-4)
    assert res.ttft_err[0] == pytest.approx(res.pred_ttft_s[0] / 0.02 - 1)


def test_trace_comparison_matches_turns_by_session_and_turn(profile, tmp_path):
    trace = pd.DataFrame({"session_id": ["a", "a", "b"], "turn": [0, 1, 0], "arrival_s": [0.0, math.nan, 0.01],
                          "think_s": [math.nan, 0.2, math.nan], "prompt_tokens": [100, 50, 300],
                          "output_tokens": [4, 4, 4]})
    tp = write_trace(trace, tmp_path / "t.parquet")
    sim = simulate_run("dram_overlap", tp, profile)
    # a "measurement" equal to the simulation, rows shuffled: the join must still pair them
    meas = sim[["session_id", "turn", "arrival_s", "ttft_s", "queue_s"]].copy()
    meas["start_s"] = meas.arrival_s + meas.queue_s
    meas["first_token_s"] = meas.arrival_s + meas.ttft_s
    meas["end_s"] = 1.0
    meas["run"] = "dram_overlap"
    meas = meas.iloc[::-1]
    df, summary = compare_trace(meas, tp, profile)
    assert summary["dram_overlap"]["turns"] == 3
    assert summary["dram_overlap"]["ttft_mape"] == pytest.approx(0.0, abs=1e-12)
    # replaying the measured arrivals of a closed-loop run reproduces it; so does its own think time
    assert summary["dram_overlap"]["ttft_mape_think_time"] == pytest.approx(0.0, abs=1e-12)
    # and a measurement 10% slower on every turn gives a 1/1.1 - 1 error everywhere
    meas["ttft_s"] *= 1.1
    _, summary = compare_trace(meas, tp, profile)
    assert summary["dram_overlap"]["ttft_mape"] == pytest.approx(1 - 1 / 1.1)


def test_validation_plot_titles_name_the_run_the_model_and_the_profiles_gpu(profile):
    from gpu.validate import device_run_name, plot_title

    assert device_run_name("results/gpu/run10_sharegpt/trace_runs.csv") == "run10_sharegpt"
    assert device_run_name("results/gpu/run11_ssd/sharegpt/trace_runs.csv") == "run11_ssd/sharegpt"
    assert device_run_name(profile.parent / "x" / "isolated.csv") == "x"
    # the device recorded by calibration (calibration_samples: "test"), each model once, in order
    assert plot_title("run9", profile, ["llama2-7b", "llama2-13b", "llama2-7b"]) == "run9: llama2-7b, llama2-13b on test"
