"""bench/gpu_repeat_floor.py: two real runs that made the same decisions, compared turn by turn."""
import pandas as pd
import pytest

from tests.bench_modules import load_bench

rf = load_bench("gpu_repeat_floor")


def _turns(run, ttft, tpot):
    return pd.DataFrame(dict(run=run, session_id=["a", "b"], turn=[0, 0], arrival_s=[0.0, 1.0], ttft_s=ttft,
                             tpot_s=tpot, finish_s=[2.0, 3.0], output_tokens=[10, 30]))


def test_the_twin_runs_ttft_spread_averages_both_directions_and_a_run_that_loaded_is_no_twin():
    turns = pd.concat([_turns("hbm_r8", [0.10, 0.20], [0.02, 0.02]), _turns("dram_r8", [0.11, 0.18], [0.021, 0.02]),
                       _turns("hbm_r2", [0.1, 0.1], [0.02, 0.02]), _turns("dram_r2", [0.2, 0.2], [0.02, 0.02])])
    steps = pd.DataFrame(dict(run=["hbm_r8", "dram_r8", "hbm_r2", "dram_r2"], ext_tokens=[0, 0, 0, 64]))
    got = rf.repeat_pairs(turns, steps)
    assert [r["pair"] for r in got] == ["dram_r8 vs hbm_r8"]   # dram_r2 loaded 64 tokens back: other decisions
    r = got[0]
    # dram against hbm: 0.01/0.10 and 0.02/0.20 -> 10%; hbm against dram: 0.01/0.11 and 0.02/0.18 -> 10.10%
    assert r["ttft_mape"] == pytest.approx((0.10 + (0.01 / 0.11 + 0.02 / 0.18) / 2) / 2)
    # TPOT: 5% on one request of two, either way round (0.001/0.02 and 0.001/0.021)
    assert r["tpot_mape"] == pytest.approx((0.05 / 2 + (0.001 / 0.021) / 2) / 2)
    assert r["ttft_mean_diff"] == pytest.approx((0.145 - 0.15) / 0.15)
    assert r["throughput_diff"] == pytest.approx(0.0)   # same tokens, same makespan
    assert r["turns"] == 2
