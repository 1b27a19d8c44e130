"""Planner search logic on synthetic monotone functions (no simulator)."""
import math

import pytest

from sim.errors import KvsimError
from sim.plan import (Candidate, Evaluation, Slo, capacity_ladder, metric_value, monotonicity_violations,
                      parse_slo, plan_capacity, search_min_feasible)

GB = 1e9


def test_parse_slo_reads_metric_operator_and_threshold():
    assert parse_slo("ttft_p99_ms<=500") == Slo("ttft_p99_ms", "<=", 500.0)
    assert parse_slo(" hit_rate_dram >= 0.5 ") == Slo("hit_rate_dram", ">=", 0.5)
    assert Slo("x", "<", 1).met(0.5) and not Slo("x", "<", 1).met(1.0)
    assert not Slo("x", "<=", 1).met(float("nan"))


@pytest.mark.parametrize("bad", ["ttft_p99_ms", "ttft<=fast", "<=3", "a==3"])
def test_parse_slo_rejects_malformed_text(bad):
    with pytest.raises(KvsimError, match="--slo"):
        parse_slo(bad)


def test_metric_value_converts_seconds_keys_to_milliseconds():
    assert metric_value({"ttft_p99_s": 0.25}, "ttft_p99_ms") == 250.0
    assert metric_value({"ttft_p99_s": 0.25}, "ttft_p99_s") == 0.25
    with pytest.raises(KvsimError, match="not a summary metric"):
        metric_value({"ttft_p99_s": 0.25}, "tpot_ms")


@pytest.mark.parametrize("threshold", [0, 1, 7, 63, 64, 99, 100])
@pytest.mark.parametrize("width", [1, 3])
def test_search_finds_least_feasible_value_in_logarithmic_rounds(threshold, width):
    ladder = list(range(101))
    calls = []

    def feasible_many(xs):
        calls.append(list(xs))
        return [x >= threshold for x in xs]

    answer, judged = search_min_feasible(ladder, feasible_many, width=width)
    assert answer == threshold
    # top, bottom, then ceil(log_{width+1}(100)) rounds at most
    assert len(calls) <= 2 + math.ceil(math.log(100, width + 1)) + 1
    assert all(ok == (x >= threshold) for x, ok in judged)


def test_search_returns_none_when_even_the_top_fails():
    answer, judged = search_min_feasible([1, 2, 3], lambda xs: [False] * len(xs))
    assert answer is None and judged == [(3.0, False)]


def test_search_trusts_a_top_known_feasible_without_judging_it():
    answer, judged = search_min_feasible([1, 2, 3, 4], lambda xs: [x >= 2 for x in xs], hi_known_feasible=True)
    assert answer == 2 and 4.0 not in [x for x, _ in judged]


def test_capacity_ladder_includes_both_ends():
    assert capacity_ladder(0, 100, 30) == [0, 30, 60, 90, 100]
    with pytest.raises(KvsimError):
        capacity_ladder(0, 100, 0)


def _synthetic(ttft_s_of):
    """evaluate_many over a closed-form TTFT(dram, ssd, gpus) and an hourly price as cost."""
    calls = []

    def evaluate_many(cands):
        calls.extend(cands)
        return [Evaluation(ttft_s_of(c), c.gpus * 4.0 + c.dram_bytes / GB * 0.01 + c.ssd_bytes / GB * 0.001)
                for c in cands]
    return evaluate_many, calls


def test_plan_picks_cheapest_capacity_meeting_slo_on_a_monotone_function():
    # TTFT falls as the cache (DRAM counts fully, SSD at a fifth) grows; SLO needs effective cache >= 300 GB.
    def ttft_ms(c):
        eff = c.dram_bytes / GB + 0.2 * c.ssd_bytes / GB
        return 1000.0 / (1 + eff / 100)

    evaluate_many, calls = _synthetic(ttft_ms)
    dram = capacity_ladder(0, 1024 * GB, 16 * GB)
    ssd = [0, 1000 * GB, 4000 * GB]
    plan = plan_capacity(evaluate_many, Slo("ttft_p99_ms", "<=", 250.0), [1], ssd, dram)
    by_ssd = {f.ssd_bytes: f.dram_bytes for f in plan.frontier}
    assert by_ssd[0] == 304 * GB           # first ladder step with eff >= 300
    assert by_ssd[1000 * GB] == 112 * GB   # 200 GB of the cache now comes from SSD
    assert by_ssd[4000 * GB] == 0          # SSD alone suffices
    # cost 4 + 0.01/GB DRAM + 0.001/GB SSD: 7.04 (no SSD), 6.12 (1 TB SSD), 8.00 (4 TB SSD)
    assert (plan.best.ssd_bytes, plan.best.dram_bytes) == (1000 * GB, 112 * GB)
    # bisection, not a grid: far fewer simulations than the 65 x 3 grid, and none repeated
    assert len(calls) == len(set(calls)) and len(calls) < 30
    assert plan.monotonicity_violations == []


def test_plan_considers_each_gpu_count_and_reports_infeasible_ones():
    # one GPU can never meet the SLO (queueing floor 400 ms); two GPUs can with enough DRAM
    evaluate_many, _ = _synthetic(lambda c: (400.0 if c.gpus == 1 else 100.0) + 200.0 * (c.dram_bytes < 64 * GB))
    plan = plan_capacity(evaluate_many, Slo("ttft_p99_ms", "<=", 150.0), [1, 2], [0], capacity_ladder(0, 128 * GB, 8 * GB))
    assert [f.dram_bytes for f in plan.frontier if f.gpus == 1] == [None]
    assert plan.best.gpus == 2 and plan.best.dram_bytes == 64 * GB


def test_monotonicity_violations_flag_a_bigger_cache_that_breaks_the_slo():
    slo = Slo("ttft_p99_ms", "<=", 100.0)
    evals = {Candidate(1, 10, 0): Evaluation(90.0, 1.0), Candidate(1, 20, 0): Evaluation(120.0, 2.0),
             Candidate(1, 30, 0): Evaluation(80.0, 3.0)}
    assert monotonicity_violations(evals, slo) == [(Candidate(1, 10, 0), Candidate(1, 20, 0))]


def test_plan_end_to_end_on_the_simulator_meets_the_slo_it_prints(tmp_path, capsys):
    import numpy as np
    import pandas as pd
    import yaml

    from sim.cli import main

    rng = np.random.default_rng(0)
    rows = [{"session_id": f"s{s}", "turn": t, "arrival_s": 2.0 * s if t == 0 else None,
             "think_s": None if t == 0 else 5.0, "prompt_tokens": int(rng.integers(50, 400)),
             "output_tokens": int(rng.integers(20, 200))}
            for s in range(60) for t in range(4)]
    pd.DataFrame(rows).to_parquet(tmp_path / "trace.parquet", index=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": "llama2-13b", "workload": {"trace": "trace.parquet"}}))
    from sim.config import load_config
    from sim.runner import run_simulation

    def p99_ms(dram):
        cfg = load_config(tmp_path / "base.yaml", {"host.dram_bytes": dram, "ssd.bytes": 0,
                                                   "workload.session_rate_per_s": 0.5})
        return run_simulation(cfg).summary["ttft_p99_s"] * 1e3

    lo, hi = p99_ms(0), p99_ms("64GB")
    assert hi < lo  # the store helps on this workload, so there is something to plan
    slo = (lo + hi) / 2
    rc = main(["plan", "--config", str(tmp_path / "base.yaml"), "--slo", f"ttft_p99_ms<={slo}", "--rate", "0.5",
               "--dram-max", "64GB", "--dram-step", "4GB", "--ssd", "0", "--jobs", "1", "--replications", "2",
               "--out", str(tmp_path / "plan")])
    out = capsys.readouterr().out
    assert rc == 0 and "cheapest configuration meeting" in out
    assert "2 runs per candidate (seeds 0..1 redraw Poisson session arrivals" in out
    table = pd.read_csv(tmp_path / "plan" / "plan.csv")
    best = table[table["cheapest"]].iloc[0]
    assert best["meets_slo"] and 0 < best["dram_bytes"] <= 64e9 and (table["runs"] == 2).all()
    # the answer is the least evaluated DRAM that meets the SLO, and the ladder step below it was seen to miss
    below = table[table["dram_bytes"] < best["dram_bytes"]]
    assert not below["meets_slo"].any() and (best["dram_bytes"] - 4e9) in set(below["dram_bytes"])
    assert len(table) < 17  # bisection over the 17-step ladder, not the grid
    assert (tmp_path / "plan" / "plan.png").stat().st_size > 5000
    # an impossible SLO: no answer, exit 1, and the curve is still printed
    rc = main(["plan", "--config", str(tmp_path / "base.yaml"), "--slo", "ttft_p99_ms<=0", "--dram-max", "64GB",
               "--dram-step", "32GB", "--ssd", "0", "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "NO configuration in the searched range meets ttft_p99_ms<=0" in out
    # no --rate: the trace's arrivals are replayed, the seed redraws nothing, one run per candidate is exact
    assert "evaluated points (1 candidates, 1 simulations)" in out and "one run per candidate is exact" in out
