"""vLLM benchmark metrics (TPOT, ITL, E2E, goodput), the ITL histogram, the HBM series and the
streamed per-turn table, against hand-computed numbers."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sim.config import load_config
from sim.costmodel import build_cost_model
from sim.metrics import GapHistogram, GoodputSlo, HbmSeries, Recorder, TurnRows
from sim.plan import metric_value
from sim.runner import run_simulation, write_results, write_turns_parquet
from sim.workload import load_workload
from workloads import random_sessions


def _two_turns():
    # one session: turn 0 (300 prompt, 20 reply tokens), then turn 1 (100, 10) 50 s after the reply
    return pd.DataFrame([
        dict(session_id="a", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=300, output_tokens=20),
        dict(session_id="a", turn=1, arrival_s=np.nan, think_s=50.0, prompt_tokens=100, output_tokens=10),
    ])


def _run(df, slo=GoodputSlo(), **over):
    cfg = load_config({}, {"model": "llama2-7b", "scheduler.kind": "prefill_first", **over})
    return run_simulation(cfg, load_workload(cfg, df), slo), cfg


def test_two_turn_run_tpot_itl_and_e2e_follow_vllm_definitions():
    res, cfg = _run(_two_turns())
    cm = build_cost_model(cfg)
    t = res.turns.set_index("turn")
    # alone on the GPU, turn 0 decodes its 19 tokens after the first one at batch 1, its context
    # growing from 300 + 1 tokens by one per iteration; turn 1 holds 320 tokens of history + 100 + 1
    gaps0 = [cm.decode_step_s(1, 301 + j) for j in range(19)]
    gaps1 = [cm.decode_step_s(1, 421 + j) for j in range(9)]
    assert t.loc[0, "tpot_s"] == pytest.approx(sum(gaps0) / 19, rel=1e-12)
    assert t.loc[1, "tpot_s"] == pytest.approx(sum(gaps1) / 9, rel=1e-12)
    for turn in (0, 1):
        assert t.loc[turn, "e2e_s"] == pytest.approx(t.loc[turn, "finish_s"] - t.loc[turn, "arrival_s"], rel=1e-15)
        assert t.loc[turn, "e2e_s"] == pytest.approx(t.loc[turn, "ttft_s"] + t.loc[turn, "decode_s"], rel=1e-12)
    s = res.summary
    assert s["tpot_mean_s"] == pytest.approx((sum(gaps0) / 19 + sum(gaps1) / 9) / 2, rel=1e-12)
    assert s["itl_mean_s"] == pytest.approx((sum(gaps0) + sum(gaps1)) / 28, rel=1e-12)  # all 28 gaps
    # every gap lies between the shortest and the longest iteration (percentiles within one bin)
    assert gaps0[0] * 0.995 <= s["itl_p50_s"] <= gaps1[-1] * 1.005
    assert s["e2e_p50_s"] == pytest.approx(t["e2e_s"].mean(), rel=1e-12)  # median of two values
    assert s["preemptions"] == 0 and (t["preemptions"] == 0).all()
    # turn 1 reuses turn 0's whole context (300 + 20 tokens) from DRAM
    assert (s["hit_tokens_hbm"], s["hit_tokens_dram"], s["hit_tokens_ssd"]) == (0, 320, 0)


def test_a_one_token_reply_has_no_tpot_and_meets_any_tpot_bound():
    df = _two_turns()
    df.loc[0, "output_tokens"] = 1
    res, _ = _run(df, GoodputSlo(ttft_s=None, tpot_s=1e-9))
    t = res.turns.set_index("turn")
    assert np.isnan(t.loc[0, "tpot_s"]) and t.loc[1, "tpot_s"] > 1e-9
    assert res.summary["goodput_turns_per_s"] == pytest.approx(1 / res.summary["makespan_s"], rel=1e-15)


def test_goodput_counts_the_turns_meeting_every_slo_per_second_of_makespan():
    res, _ = _run(_two_turns())
    t = res.turns.set_index("turn")
    ttft0, ttft1 = t.loc[0, "ttft_s"], t.loc[1, "ttft_s"]
    assert ttft1 < ttft0  # the second turn reuses its history
    span = res.summary["makespan_s"]
    assert span == pytest.approx(t.loc[1, "finish_s"] - 1.0, rel=1e-15)
    assert res.summary["goodput_turns_per_s"] == pytest.approx(2 / span, rel=1e-15)  # default SLOs: both meet
    cut = (ttft0 + ttft1) / 2
    assert _run(_two_turns(), GoodputSlo(ttft_s=cut))[0].summary["goodput_turns_per_s"] == pytest.approx(1 / span)
    tpot1 = t.loc[1, "tpot_s"]
    one = _run(_two_turns(), GoodputSlo(ttft_s=cut, tpot_s=tpot1 * 0.999))[0].summary
    assert one["goodput_turns_per_s"] == 0.0  # turn 0 misses the TTFT bound, turn 1 the TPOT bound
    assert one["goodput_slo_ttft_s"] == cut and "goodput_slo_e2e_s" not in one


def _nearest_rank(values, q):
    return float(np.percentile(np.asarray(values, float), q, method="inverted_cdf"))


def test_itl_percentiles_of_hand_built_spans_and_stalls():
    rec = Recorder(0)
    rec.decode_span(2, 3, 0.010, 0.0)  # 2 sequences x 3 iterations of 10 ms
    rec.decode_span(1, 4, 0.020, 0.001)  # 20, 21, 22, 23 ms
    rec.prefill_stall(1, 0.5)  # the one running sequence waits a 500 ms prefill, which admits two more
    rec.decode_span(3, 2, 0.010, 0.0)  # gaps: 510 ms (stalled), 10, 10 (joined), then 3 x 10
    gaps = [0.010] * 11 + [0.020, 0.021, 0.022, 0.023, 0.510]
    h = rec.itl
    assert h.n == 16
    assert h.mean() == pytest.approx(sum(gaps) / 16, rel=1e-12)
    assert h.percentile(50) == pytest.approx(0.010, rel=1e-12)  # rank 8 of 16
    assert h.percentile(75) == pytest.approx(0.020, rel=1e-12)  # rank 12
    assert h.percentile(90) == pytest.approx(0.023, rel=1e-12)  # rank ceil(14.4) = 15
    assert h.percentile(99) == pytest.approx(0.510, rel=1e-12)
    for q in (50, 75, 90, 99):
        assert h.percentile(q) == pytest.approx(_nearest_rank(gaps, q), rel=1e-12)


def test_a_synchronous_save_after_a_prefill_lengthens_the_first_gap_of_the_sequences_it_admitted():
    rec = Recorder(0)
    rec.decode_span(1, 1, 0.010, 0.0)
    rec.prefill_stall(1, 0.30, joining_s=0.05)  # 250 ms prefill + 50 ms save; admitted ones wait the save
    rec.decode_stall(2, 0.02)  # then a 20 ms save of a finished one-token turn stalls both
    rec.decode_span(2, 1, 0.010, 0.0)
    gaps = sorted([0.010, 0.010 + 0.30 + 0.02, 0.010 + 0.05 + 0.02])
    assert rec.itl.n == 3
    assert rec.itl.mean() == pytest.approx(sum(gaps) / 3, rel=1e-12)
    assert [rec.itl.percentile(q) for q in (30, 60, 100)] == pytest.approx(gaps, rel=1e-12)


def test_histogram_bins_are_half_a_percent_wide():
    h = GapHistogram()
    h.add_gaps(0.1, 1)
    h.add_gaps(0.1006, 1)  # 0.6% longer: its own bin
    assert (h.percentile(50), h.percentile(100)) == pytest.approx((0.1, 0.1006), rel=1e-12)
    # a spread of lengths: 1001 iterations from 100 to 200 ms; every percentile within one bin
    g = GapHistogram()
    g.add_span(3, 1001, 0.1, 0.0001)
    lengths = 0.1 + 0.0001 * np.arange(1001)
    assert g.n == 3003
    assert g.mean() == pytest.approx(lengths.mean(), rel=1e-12)
    for q in (1, 10, 50, 90, 99):
        assert g.percentile(q) == pytest.approx(_nearest_rank(lengths, q), rel=0.005)
    assert GapHistogram.RATIO == 1.005


def test_spans_of_equal_and_of_growing_iterations_are_binned_together():
    # the histogram buffers the two kinds apart (the engines' spans are all of equal iterations)
    h = GapHistogram()
    h.add_span(2, 3, 0.1, 0.0)  # six gaps of 100 ms
    h.add_span(1, 3, 0.2, 0.01)  # 200, 210 and 220 ms
    h.add_gaps(0.05, 4)  # four of 50 ms
    assert h.n == 13
    assert h.mean() == pytest.approx((4 * 0.05 + 6 * 0.1 + 0.2 + 0.21 + 0.22) / 13, rel=1e-12)
    # nearest ranks of 13: 4th, 7th, 11th, 13th
    assert [h.percentile(q) for q in (30, 50, 80, 100)] == pytest.approx([0.05, 0.1, 0.2, 0.22], rel=1e-12)


def test_itl_gaps_add_up_to_every_turns_decode_time_under_contention():
    """Each reply's gaps sum to its decode time, prefill and save stalls included: the mean gap is
    sum(decode_s) / sum(output - 1) over replies of more than one token."""
    for over in ({}, {"policy.async_save": False}, {"policy.kind": "recompute"}):
        res, _ = _run(random_sessions(60, seed=3, rate_per_s=5), **over)
        t = res.turns
        many = t["output_tokens"] > 1
        want = t.loc[many, "decode_s"].sum() / (t.loc[many, "output_tokens"] - 1).sum()
        assert res.summary["itl_mean_s"] == pytest.approx(want, rel=1e-9), over
        assert res.summary["itl_p99_s"] > res.summary["itl_p50_s"]  # prefills stall running decodes


def test_hbm_series_keeps_one_point_per_interval_and_thins_when_full():
    s = HbmSeries(interval_s=1.0, max_points=4)
    for t, r in [(0.0, 1), (0.5, 2), (1.0, 3), (1.2, 4), (2.5, 5), (3.6, 6)]:
        s.sample(t, float(r), 10.0 * r)
    # kept 0, 1.0, 2.5, 3.6; four points: the newest and every other one before it stay, interval 2 s
    assert s.t == [1.0, 3.6] and s.reserved == [3.0, 6.0] and s.cached == [30.0, 60.0]
    s.sample(5.0, 7.0, 70.0)
    s.sample(5.6, 8.0, 80.0)
    assert s.t == [1.0, 3.6, 5.6]
    assert list(s.table().columns) == ["time_s", "reserved_bytes", "cached_bytes"]


@pytest.mark.parametrize("kind", ["prefill_first", "chunked"])
def test_hbm_usage_is_written_beside_the_turns(tmp_path, kind):
    res, cfg = _run(random_sessions(30, seed=1, rate_per_s=5), **{"scheduler.kind": kind})
    write_results(res, tmp_path)
    h = pd.read_parquet(tmp_path / "hbm_usage.parquet")
    assert len(h) >= 2 and (np.diff(h["time_s"]) >= 1.0).all()  # at most one point a second
    cap = build_cost_model(cfg).hbm_kv_bytes
    assert (h["reserved_bytes"] > 0).any() and ((h["reserved_bytes"] + h["cached_bytes"]) <= cap).all()


def test_turns_parquet_written_in_row_groups_reads_back_as_the_table(tmp_path):
    res, _ = _run(random_sessions(20, seed=2))
    n = len(res.turns)
    path = write_turns_parquet(res.rows, tmp_path / "turns.parquet", chunk_rows=7)
    assert pq.ParquetFile(path).num_row_groups == -(-n // 7)
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, res.turns)
    assert str(back["hit_tier"].dtype) == "category"


def test_recorder_preemptions_column_counts_what_the_engine_adds():
    rec = Recorder(3)
    rec.preemptions[1] += 1
    rec.preemptions[1] += 1
    wl = type("W", (), {"session": ["a", "a", "b"], "turn": np.array([0, 1, 0])})()
    assert TurnRows(rec, wl).table()["preemptions"].tolist() == [0, 2, 0]


def test_plan_slo_reads_the_vllm_metrics_from_a_run_summary():
    s = _run(_two_turns())[0].summary
    assert metric_value(s, "tpot_p99_ms") == pytest.approx(s["tpot_p99_s"] * 1000.0)
    assert metric_value(s, "itl_p99_ms") == pytest.approx(s["itl_p99_s"] * 1000.0)
    assert metric_value(s, "e2e_p99_s") == s["e2e_p99_s"]
    assert metric_value(s, "goodput_turns_per_s") == s["goodput_turns_per_s"]
