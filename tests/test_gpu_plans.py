"""One table of run plans: the executor's plan and the simulator's description of each named run agree."""
import pandas as pd
import pytest

from gpu.executor import TraceBounds
from gpu.plans import PLANS, TRACE_RUNS, ServePlan, run_name, sim_overrides
from sim.config import load_config
from sim.errors import KvsimError
from sim.models import READ_BUFFER_LAYERS


def test_each_run_is_simulated_with_its_executor_plans_tier_and_preload():
    assert sim_overrides("recompute") == {"policy.kind": "recompute"}
    assert sim_overrides("dram_sync") == {"policy.kind": "attentionstore", "policy.layerwise_preload": False,
                                          "policy.read_buffer_layers": 2}
    assert sim_overrides("dram_overlap") == {"policy.kind": "attentionstore", "policy.layerwise_preload": True,
                                             "policy.read_buffer_layers": 2}
    # the SSD run has no DRAM tier: every reused turn reads the SSD
    assert sim_overrides("ssd_overlap") == {"policy.kind": "attentionstore", "policy.layerwise_preload": True,
                                            "policy.read_buffer_layers": 2, "host.dram_bytes": 0}


def test_a_run_the_simulator_cannot_describe_is_one_line_naming_the_choices():
    for run in ("hbm", "dram_overlapped"):
        with pytest.raises(KvsimError, match=f"run '{run}': expected one of recompute, dram_sync"):
            sim_overrides(run)


def test_every_plan_is_named_as_the_executor_rows_name_it():
    assert {run_name(plan): name for name, plan in PLANS.items()} == {name: name for name in PLANS}
    assert set(TRACE_RUNS) <= set(PLANS)


def test_executor_and_simulator_share_the_read_buffer_the_committed_gpu_runs_used():
    # every committed run that overlapped its loads ran with a read buffer of 2 layers
    iso = pd.read_csv("results/gpu/run9_shared_ssd/isolated.csv")
    assert set(iso[iso.overlap & iso.tier.isin(["dram", "ssd"])].read_buffer_layers) == {2}
    assert READ_BUFFER_LAYERS == 2
    assert ServePlan("dram").read_buffer_layers == READ_BUFFER_LAYERS
    cfg = load_config({"name": "t", "model": "llama2-7b", "gpu": {"name": "h100-80gb"},
                       "workload": {"trace": "results/gpu/trace_slice.parquet"}})
    assert cfg.policy.read_buffer_layers == READ_BUFFER_LAYERS


def test_trace_bounds_hold_every_session_and_the_longest_turn():
    trace = pd.DataFrame({"session_id": ["a", "a", "b"], "turn": [0, 1, 0], "prompt_tokens": [10, 5, 30],
                          "output_tokens": [4, 6, 2]})
    b = TraceBounds.of(trace)
    assert sorted(b.capacities) == [10 + 4 + 5 + 6 + 1, 30 + 2 + 1]
    assert b.max_ctx == 33 + 8 and b.max_new == 32 + 8
    # 100 bytes a token; each session's reservation rounded to 2 x 4096-byte alignment
    assert b.host_bytes(100) == (26 + 33) * 100 + 2 * 8192
    assert b.host_bytes(100, extra_sessions=1, extra_tokens=7) == (26 + 33 + 7) * 100 + 3 * 8192
