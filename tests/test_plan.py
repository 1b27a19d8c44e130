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
    # a GPU whose HBM cannot keep every history between turns (its prefix cache would make DRAM moot)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": "llama2-13b", "workload": {"trace": "trace.parquet"},
                                                        "gpu": {"hbm_bytes": "34GB"}}))
    from sim.config import load_config
    from sim.runner import run_simulation

    def p99_ms(dram):
        cfg = load_config(tmp_path / "base.yaml", {"host.dram_bytes": dram, "ssd.bytes": 0,
                                                   "workload.session_rate_per_s": 0.5})
        return run_simulation(cfg).summary["ttft_p99_s"] * 1e3

    lo, hi = p99_ms(0), p99_ms("64GB")
    assert hi < lo  # the store helps on this workload, so there is something to plan
    slo = (lo + hi) / 2
    # three runs: two runs' one-sided 95% bound is the mean + 4.5 standard deviations (t = 6.31), wider than
    # the store's effect on this workload's p99 when the two seeds' p99s differ by ~500 ms (they do at 64 GB)
    rc = main(["plan", "--config", str(tmp_path / "base.yaml"), "--slo", f"ttft_p99_ms<={slo}", "--rate", "0.5",
               "--dram-max", "64GB", "--dram-step", "4GB", "--ssd", "0", "--jobs", "1", "--replications", "3",
               "--out", str(tmp_path / "plan")])
    out = capsys.readouterr().out
    assert rc == 0 and "cheapest configuration meeting" in out
    assert "3 runs per candidate (seeds 0..2 redraw Poisson session arrivals" in out
    table = pd.read_csv(tmp_path / "plan" / "plan.csv")
    best = table[table["cheapest"]].iloc[0]
    assert best["meets_slo"] and 0 < best["dram_bytes"] <= 64e9 and (table["runs"] == 3).all()
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


# ---------------------------------------------------------------- bad input: one line, named for its flag

@pytest.mark.parametrize("bad", ["ttft_p99_ms<=1.2.3", "ttft_p99_ms<=e", "ttft_p99_ms<=inf", "ttft_p99_ms<=nan"])
def test_parse_slo_rejects_a_threshold_that_is_not_a_finite_number(bad):
    with pytest.raises(KvsimError, match=r"^--slo .*(not a number|not finite)"):
        parse_slo(bad)


def test_metric_value_refuses_a_text_summary_key_and_names_the_flag_that_asked():
    summary = {"policy": "attentionstore", "ttft_p99_s": 0.25, "cost_usd": 1.0}
    with pytest.raises(KvsimError, match=r"^--slo: policy: not a numeric summary metric; expected one of "
                                         r"\['cost_usd', 'ttft_p99_s'\]"):
        metric_value(summary, "policy")
    with pytest.raises(KvsimError, match=r"^--cost: dollars: not a summary metric"):
        metric_value(summary, "dollars", "--cost")


def test_a_one_byte_dram_step_is_refused_without_building_the_ladder():
    with pytest.raises(KvsimError, match=r"^--dram-step: 1 bytes makes 256,000,000,001 sizes .* expected at most 10,000"):
        capacity_ladder(0, 256 * GB, 1)
    with pytest.raises(KvsimError, match=r"^--dram-min: 64 GB is above --dram-max 32 GB"):
        capacity_ladder(64 * GB, 32 * GB, GB)


@pytest.fixture
def tiny_config(tmp_path):
    import pandas as pd
    import yaml

    rows = [{"session_id": f"s{s}", "turn": t, "arrival_s": 2.0 * s if t == 0 else None,
             "think_s": None if t == 0 else 5.0, "prompt_tokens": 100, "output_tokens": 20}
            for s in range(5) for t in range(2)]
    pd.DataFrame(rows).to_parquet(tmp_path / "trace.parquet", index=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": "llama2-7b", "workload": {"trace": "trace.parquet"}}))
    return tmp_path / "base.yaml"


@pytest.mark.parametrize("args, match", [
    (["--slo", "ttft_p99_ms<=1.2.3"], "--slo 'ttft_p99_ms<=1.2.3': '1.2.3' is not a number"),
    (["--slo", "ttft_p99_ms<=e"], "--slo 'ttft_p99_ms<=e': 'e' is not a number"),
    (["--slo", "policy<=5"], "--slo: policy: not a numeric summary metric"),
    (["--cost", "dollars_per_turn"], "--cost: dollars_per_turn: not a summary metric"),
    (["--cost", "usd/h"], "--cost 'usd/h': expected provisioned_usd_per_hour or a summary metric"),
    (["--dram-step", "1B"], "--dram-step: 1 bytes makes"),
    (["--jobs", "0"], "argument --jobs/-j: expected an integer from 1 to 1,024"),
    (["--replications", "0"], "argument --replications/-r: expected an integer from 1 to 100"),
    (["--rate", "nan"], "argument --rate: expected a finite number >= 0.0001 and <= 100000 sessions/s"),
])
def test_plan_bad_arguments_are_one_line_and_exit_2(tiny_config, capsys, args, match):
    from sim.cli import main

    argv = ["plan", "--config", str(tiny_config), "--slo", "ttft_p99_ms<=500", "--dram-max", "32GB",
            "--dram-step", "16GB", "--ssd", "0", "--jobs", "1"]
    for flag, value in zip(args[::2], args[1::2]):  # the flag under test replaces the default one
        i = argv.index(flag) if flag in argv else None
        argv = argv[:i] + argv[i + 2:] if i is not None else argv
        argv += [flag, value]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors (the bounded argument types)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err


def test_plan_out_naming_a_file_is_refused_before_the_first_simulation(tiny_config, capsys, monkeypatch):
    import sim.plan
    from sim.cli import main

    ran = []
    monkeypatch.setattr(sim.plan, "_evaluate_config", lambda cfg: ran.append(cfg) or {})
    blocker = tiny_config.parent / "plan.txt"
    blocker.write_text("x")
    assert main(["plan", "--config", str(tiny_config), "--slo", "ttft_p99_ms<=500", "--ssd", "0", "--jobs", "1",
                 "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "is not a folder" in err and ran == []


# ---------------------------------------------------------------- non-monotone metrics and replications

# TTFT p99 (ms) per (DRAM GB, SSD GB): not monotone in DRAM (48 and 80 GB miss between 32 and 64 that
# meet), and 32 GB loses the SLO when 250 GB of SSD is added.
_P99 = {0: {0: 4300, 16: 2425, 32: 1800, 48: 2150, 64: 1440, 80: 2140, 96: 1500, 112: 900, 128: 550},
        250: {0: 3900, 16: 2300, 32: 2100, 48: 2150, 64: 1400, 80: 2140, 96: 1500, 112: 850, 128: 500}}


def _non_monotone(c):
    return _P99[round(c.ssd_bytes / GB)][round(c.dram_bytes / GB)]


def test_plan_answers_with_the_cheapest_feasible_point_evaluated_and_flags_every_non_monotone_pair():
    # a cost that falls with SSD (as $ per 1k turns can: the SSD saves recomputation): 1 + 0.01/GB DRAM - 0.0008/GB SSD
    calls = []

    def evaluate_many(cands):
        calls.extend(cands)
        return [Evaluation(_non_monotone(c), 1.0 + 0.01 * c.dram_bytes / GB - 0.0008 * c.ssd_bytes / GB) for c in cands]

    slo = Slo("ttft_p99_ms", "<=", 2000.0)
    plan = plan_capacity(evaluate_many, slo, [1], [0, 250 * GB], capacity_ladder(0, 128 * GB, 16 * GB))
    # SSD 0: bisection judges 128 (ok), 0 (miss), 64 (ok), 32 (ok), 16 (miss) -> 32 GB, cost 1.32.
    # SSD 250 GB: the search below 32 GB judges its top, 32, first: it misses (the bound from SSD 0 fails),
    # so the DRAM above is searched: 128 (ok), 32 (known miss), 80 (miss), 112 (ok), 96 (ok) -> 96 GB,
    # cost 1 + 0.96 - 0.2 = 1.76.
    # (Trusting the SSD-0 answer as feasible at SSD 250 GB would answer 32 GB + 250 GB, cost 1.12, which misses.)
    assert (plan.best.dram_bytes, plan.best.ssd_bytes) == (32 * GB, 0)
    assert plan.best.evaluation.cost == pytest.approx(1.32)
    assert slo.meets(plan.best.evaluation)
    evaluated = {(round(c.dram_bytes / GB), round(c.ssd_bytes / GB)) for c in plan.evaluations}
    assert evaluated == {(128, 0), (0, 0), (64, 0), (32, 0), (16, 0),
                         (32, 250), (128, 250), (80, 250), (112, 250), (96, 250)}
    assert len(calls) == len(evaluated)  # none simulated twice
    pairs = {((round(a.dram_bytes / GB), round(a.ssd_bytes / GB)), (round(b.dram_bytes / GB), round(b.ssd_bytes / GB)))
             for a, b in plan.monotonicity_violations}
    # every evaluated (meets, misses) pair with at least as much DRAM and SSD on the missing side
    assert pairs == {((32, 0), (32, 250)), ((32, 0), (80, 250)), ((64, 0), (80, 250))}


def test_a_candidate_is_judged_on_the_95_percent_upper_bound_of_its_replications():
    # values 1800, 1900, 2000: mean 1900, sd 100, t(0.95, 2) = 2.920 -> bound 1900 + 2.920 * 100 / sqrt(3) = 2068.6
    e = Evaluation((1800.0, 1900.0, 2000.0), 1.0)
    assert e.value == 1900.0 and e.bound(upper=True) == pytest.approx(2068.59, abs=0.01)
    assert not Slo("ttft_p99_ms", "<=", 2000.0).meets(e)  # its mean meets, its bound does not
    # values 1700, 1750, 1800: mean 1750, sd 50 -> bound 1750 + 2.920 * 50 / sqrt(3) = 1834.3: meets
    assert Slo("ttft_p99_ms", "<=", 2000.0).meets(Evaluation((1700.0, 1750.0, 1800.0), 1.0))
    # a >= SLO reads the lower bound: 0.5, 0.6, 0.7 -> 0.6 - 2.920 * 0.1 / sqrt(3) = 0.4314
    assert Evaluation((0.5, 0.6, 0.7), 1.0).bound(upper=False) == pytest.approx(0.43141, abs=1e-5)
    assert not Slo("hit_rate_dram", ">=", 0.45).meets(Evaluation((0.5, 0.6, 0.7), 1.0))


def test_plan_replicates_each_candidate_over_seeds_that_redraw_arrivals(tiny_config):
    from sim.plan import SimulatorEvaluator

    ev = SimulatorEvaluator(tiny_config, {"workload.session_rate_per_s": 0.5}, Slo("ttft_p99_ms", "<=", 500.0),
                            "provisioned_usd_per_hour", jobs=1, replications=3)
    try:
        (e,) = ev([Candidate(1, 16 * GB, 0)])
    finally:
        ev.close()
    assert ev.seeds == [0, 1, 2] and ev.redraws == ["Poisson session arrivals"]
    assert len(e.values) == 3 and len(set(e.values)) > 1  # the seeds redraw something: the runs differ
    # no rate: the trace's own arrivals are replayed, so one run is exact whatever --replications says
    ev = SimulatorEvaluator(tiny_config, {}, Slo("ttft_p99_ms", "<=", 500.0), "provisioned_usd_per_hour", replications=3)
    assert ev.seeds == [0] and "one run per candidate is exact" in ev.method
