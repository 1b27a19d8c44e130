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


def test_two_calls_runs_are_matched_by_name_and_count_their_turns_preemptions():
    a = _turns("hbm_r8", [0.10, 0.20], [0.02, 0.02]).assign(preemptions=[1, 0])
    b = pd.concat([_turns("hbm_r8", [0.12, 0.20], [0.02, 0.02]).assign(preemptions=[2, 1]),
                   _turns("recompute_r8", [0.1, 0.1], [0.02, 0.02]).assign(preemptions=0)])
    (r,) = rf.across_pairs(a, b)   # recompute_r8 ran in one call only
    assert r["run"] == "hbm_r8"
    assert r["preemptions"] == (1, 3)
    assert r["ttft_mape"] == pytest.approx((0.2 / 2 + (0.02 / 0.12) / 2) / 2)


def test_calls_that_served_other_sessions_are_refused_naming_the_file(tmp_path):
    for name, sid in (("a", "s1"), ("b", "s2")):
        (tmp_path / name).mkdir()
        pd.DataFrame(dict(session_id=[sid], turn=[0])).to_csv(tmp_path / name / "traces.csv", index=False)
    with pytest.raises(SystemExit, match=r"b/traces.csv: not the sessions of .*a/traces.csv"):
        rf.across_table(tmp_path / "a", tmp_path / "b")
