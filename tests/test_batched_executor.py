"""The batched executor (gpu/batched.py) on CPU with a tiny GQA model: every logit it computes with
paged, batched, chunked, reused (HBM prefix hit, host-store load) or preempted-and-resumed KV equals a
one-pass recompute of the same tokens; block tables map tokens to the right slots; NaN in blocks a
request does not own never reaches its logits."""
import math

import pytest
import torch

from gpu.batched import BatchedExecutor, StepBatch, random_model, serve_sessions
from gpu.tp_layer import TINY_GQA
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest

from tiny_batched import BT, FakeClock, ids, run_checked, run_logits, scheduler_and_executor, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def drive(ex, sched, max_steps=500, after_step=None):
    """Run the scheduler to the end; check every scheduled request's logits against a recompute.
    Returns the plans."""
    plans = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan, _, tables = run_checked(ex, sched)
        finished = sched.update(plan)
        if after_step is not None:
            after_step(plan, finished, tables)
        plans.append(plan)
    assert not sched.has_unfinished()
    return plans


def test_block_table_maps_new_tokens_to_their_slots(model):
    ex = BatchedExecutor(model, num_blocks=10, block_tokens=BT)
    r = SeqRequest("a", 9, 2, lambda i: ("a", i))
    r.blocks = [5, 2, 9]
    r.num_computed_tokens = 6
    ex.add(r, ids(1, 9))

    class P:
        scheduled = [(r, 3, False)]
    sb: StepBatch = ex.layout(P)
    # positions 6, 7 sit in the request's block 1 (id 2) at offsets 2, 3; position 8 in block 2 (id 9)
    assert sb.positions.tolist() == [6, 7, 8]
    assert sb.slots.tolist() == [2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]
    assert sb.ids.tolist() == ids(1, 9)[6:9]
    assert sb.tables[0].tolist() == [5, 2, 9]


def test_batched_chunked_steps_equal_recompute_with_poisoned_free_blocks(model):
    # three requests under a 10-token budget: chunked prefills ride with decodes in one forward
    sched, ex = scheduler_and_executor(model, 40, 10, False, [(13, 5), (7, 6), (22, 3)], 10)
    plans = drive(ex, sched)
    assert any(sum(1 for x in p.scheduled if x.is_decode) and any(not x.is_decode for x in p.scheduled)
               for p in plans), "no step mixed decodes and prefill chunks"


def test_varlen_layout_equals_recompute(model):
    sched, ex = scheduler_and_executor(model, 40, 12, False, [(9, 4), (17, 3)], 20, attention="flash_varlen")
    drive(ex, sched)


def two_turns(ex, sched, first=(14, 6), prompt2=5):
    """Session s: turn 0, then turn 1 = turn 0's tokens (its reply included) + a new prompt."""
    r0 = SeqRequest(("s", 0), first[0], first[1], lambda i: ("s", i))
    ex.add(r0, ids(30, first[0]), session="s")
    sched.add_request(r0)
    saved = {}

    def save(plan, finished, tables):
        for r in finished:
            saved[r] = ex.save(r, tables[r], r.num_computed_tokens)
    drive(ex, sched, after_step=save)
    toks = ex.forget(r0)
    assert len(toks) == first[0] + first[1]
    r1 = SeqRequest(("s", 1), len(toks) + prompt2, 3, lambda i: ("s", i))
    ex.add(r1, toks + ids(31, prompt2), session="s")
    sched.add_request(r1)
    return r1, saved


def test_prefix_cache_hit_reuses_blocks_and_equals_recompute(model):
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=30, max_num_batched_tokens=64, block_tokens=BT))
    ex = BatchedExecutor(model, num_blocks=30, block_tokens=BT, poison=True)
    r1, _ = two_turns(ex, sched)
    plans = drive(ex, sched)
    # turn 0 computed 14 + 5 tokens' KV (its last reply token has none): 4 full blocks are cached
    assert plans[0].admitted[r1] == 16
    assert plans[0].scheduled[0].num_new_tokens == 25 - 16


def test_host_store_load_equals_recompute(model):
    # prefix caching off: the history can only come back from the host store
    ex = BatchedExecutor(model, num_blocks=30, block_tokens=BT, host_blocks=16, poison=True)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=30, max_num_batched_tokens=64, block_tokens=BT,
                                           prefix_caching=False), external_hit=ex.external_tokens)
    ex.open_session("s", 40)
    r1, saved = two_turns(ex, sched)
    assert list(saved.values()) == [16]   # 19 computed tokens: 4 whole blocks go to the host
    plans = drive(ex, sched)
    assert plans[0].admitted[r1] == 0 and plans[0].external[r1] == 16


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_host_load_step_runs_at_its_static_shape_only_when_loading_first(model, layerwise):
    """Load-first: every layer's copy, then the step's static shape (a CUDA graph on the GPU); layer-wise
    loads gate each layer's compute, so that step runs eagerly. Both equal a recompute."""
    ex = BatchedExecutor(model, num_blocks=30, block_tokens=BT, host_blocks=16, poison=True, decode_graphs=True,
                         layerwise=layerwise)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=30, max_num_batched_tokens=64, block_tokens=BT,
                                           prefix_caching=False), external_hit=ex.external_tokens)
    ex.open_session("s", 40)
    two_turns(ex, sched)
    graph = []
    run = ex.run

    def spy(plan, keep_logits=False):
        out = run(plan, keep_logits)
        if any(plan.external.values()):
            graph.append((out.graph, out.ext_tokens))
        return out
    ex.run = spy
    drive(ex, sched)
    assert graph == [(not layerwise, 16)]


def test_a_skipped_host_load_is_caught_by_the_poison(model):
    """The check above can fail: without the load, the request attends NaN-filled blocks."""
    ex = BatchedExecutor(model, num_blocks=30, block_tokens=BT, host_blocks=16, poison=True)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=30, max_num_batched_tokens=64, block_tokens=BT,
                                           prefix_caching=False), external_hit=ex.external_tokens)
    ex.open_session("s", 40)
    two_turns(ex, sched)
    ex._issue_loads = lambda loads, main: None
    with pytest.raises(AssertionError, match="NaN logits"):
        drive(ex, sched)


def test_preemption_by_recompute_still_equals_recompute(model):
    # 12 blocks of 4 tokens for three requests that need 6-8 blocks each: the scheduler preempts
    sched, ex = scheduler_and_executor(model, 12, 16, True, [(10, 16), (9, 14), (11, 15)], 40)
    drive(ex, sched)
    assert sched.stats.preemptions > 0


def test_serve_sessions_follows_arrivals_and_think_times(model):
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, host_blocks=64)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=60, max_num_batched_tokens=32, block_tokens=BT,
                                           prefix_caching=False), external_hit=ex.external_tokens)
    sessions = {"a": [(0.0, math.nan, 9, 4), (math.nan, 0.5, 6, 3)],
                "b": [(0.2, math.nan, 21, 5)]}
    clk = FakeClock()
    res = serve_sessions(ex, sched, sessions, clock=clk, sleep=clk.sleep)
    turns = {(t.session_id, t.turn): t for t in res.turns}
    assert set(turns) == {("a", 0), ("a", 1), ("b", 0)}
    a0, a1, b0 = turns[("a", 0)], turns[("a", 1)], turns[("b", 0)]
    # turn 1 arrives think_s after turn 0's reply ended, and carries turn 0's 13 tokens + 6 new
    assert a1.arrival_s == pytest.approx(a0.finish_s + 0.5)
    assert a1.prompt_tokens == 19
    # turn 0 computed 12 tokens' KV: 3 whole blocks come back from the host store
    assert a1.ext_tokens == 12 and a0.saved_tokens == 12
    assert b0.arrival_s == pytest.approx(0.2) and b0.first_token_s > 0.2
    for t in res.turns:
        assert t.arrival_s < t.first_token_s <= t.finish_s
    assert sum(s.decodes for s in res.steps) == sum(t.output_tokens - 1 for t in res.turns)
    assert sum(s.chunk_tokens for s in res.steps) == sum(t.prompt_tokens - t.ext_tokens for t in res.turns)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["flash_varlen"])
def test_cuda_flash_kinds_equal_sdpa(kind):
    m = random_model(TINY_GQA, 512, "cuda", torch.bfloat16, seed=3)
    outs = {}
    for k in ("sdpa", kind):
        sched, ex = scheduler_and_executor(m, 40, 10, True, [(37, 5), (70, 6)], 50, block_tokens=16, poison=False,
                                           attention=k)
        outs[k] = run_logits(sched, ex)
    err = (outs[kind] - outs["sdpa"]).norm() / outs["sdpa"].norm()
    assert err < 2e-2


# ---- the comparison side (gpu/batched_validate.py) and the device script's CPU path ---------------

class ConstantCost:
    """A cost model whose every step costs 10 ms (20 ms with a host load): timings by hand."""
    shape = TINY_GQA

    def history_load_layer_s(self, chunk_bytes):
        return 0.001 if chunk_bytes else 0.0

    def iteration(self, chunks, batch, ctx, load_layer_s=0.0, buffer_layers=2, layerwise=True):
        class It:
            total_s = 0.010 + (0.010 if load_layer_s else 0.0)
        return It()

    def decode_span(self, batch, ctx, kmax, budget_s=math.inf):
        return 0.010 * kmax, kmax


def test_simulated_sessions_advance_by_the_cost_of_each_step():
    import pandas as pd
    from gpu.batched_validate import simulate_sessions, turns_frame
    trace = pd.DataFrame({"session_id": ["a", "a"], "turn": [0, 1], "arrival_s": [0.5, math.nan],
                          "think_s": [math.nan, 1.0], "prompt_tokens": [8, 5], "output_tokens": [3, 2]})
    t = turns_frame(simulate_sessions(ConstantCost(), trace, "dram", num_blocks=50, block_tokens=4))
    a0, a1 = t.iloc[0], t.iloc[1]
    # turn 0: the prefill step ends at 0.51 (first token), two decode steps end at 0.53
    assert a0.ttft_s == pytest.approx(0.010) and a0.finish_s == pytest.approx(0.53)
    assert a0.tpot_s == pytest.approx(0.010)
    # turn 1 arrives 1 s later with 11 + 5 tokens; turn 0 computed 10 tokens' KV: 2 full blocks,
    # still cached in HBM (the host store's copy is not needed), then one prefill and one decode step
    assert a1.arrival_s == pytest.approx(1.53) and (a1.hit_tokens, a1.ext_tokens) == (8, 0)
    assert a0.saved_tokens == 8
    assert a1.ttft_s == pytest.approx(0.010) and a1.finish_s == pytest.approx(1.55)


def test_a_step_with_a_host_load_is_priced_as_an_iteration_with_its_load():
    from gpu.batched_validate import step_cost_s
    cost = ConstantCost()
    assert step_cost_s(cost, [], 3, 30, [], 2, True) == pytest.approx(0.010)       # a decode step
    assert step_cost_s(cost, [], 3, 30, [16], 2, True) == pytest.approx(0.020)     # a load rides along
    assert step_cost_s(cost, [(5, 16)], 3, 30, [16], 2, True) == pytest.approx(0.020)


def test_device_script_cpu_smoke_writes_every_file(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/gpu_batched_validate.py", "--cpu-smoke", "--policies", "dram",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for f in ("env.json", "attn_bench.csv", "traces.csv", "turns.csv", "steps.csv", "compare.json",
              "iteration_raw.csv", "profile_calibrated.yaml", "graph_bench.csv", "replay_steps.csv"):
        assert (tmp_path / f).exists(), f
    # decode graphs on by default; on CPU their static body runs eagerly, with the eager path's logits
    import pandas as pd
    gb = pd.read_csv(tmp_path / "graph_bench.csv")
    assert len(gb) == 3 and gb.graph_graph.all() and not gb.eager_graph.any() and (gb.rel_err < 1e-5).all()
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["decode_graphs"]["eager_static_steps"] > 0 and env["decode_graphs"]["failed"] is None
    assert pd.read_csv(tmp_path / "steps.csv").graph.any()
    # the replayed runs' shapes were timed and priced at their static shapes, with the loop's host time
    import yaml
    it = yaml.safe_load((tmp_path / "profile_calibrated.yaml").read_text())["models"]["llama3.1-8b"]["iteration"]
    raw = pd.read_csv(tmp_path / "iteration_raw.csv")
    assert (raw.kind == "step").sum() > 0 and len(it["steps_ms"]["ms"]) > 0 and it["host_step_ms"]["ms"]
    assert env["decode_graphs"]["chunk_shapes"] == sum(1 for n in it["steps_ms"]["chunk_tokens"] if n)
    # the call's own calibrated profile and the committed one each price every run
    result = json.loads((tmp_path / "compare.json").read_text())
    assert set(result) == {"calibrated", "committed"}
    assert result["calibrated"]["iteration_section"] and not result["committed"]["iteration_section"]
    for summary in result.values():
        runs = summary["runs"]
        assert set(runs) == {"dram_r4", "dram_r8", "hbm_r8_preempt", "dram_r8_preempt",
                             "dram_r8_preempt_loadfirst", "ssd_r8_preempt"}
        assert all(v["turns_matched"] == v["turns_meas"] > 0 for v in runs.values())
    # the smoke adds the SSD tier's run: histories read back from session files, every save written
    steps = pd.read_csv(tmp_path / "steps.csv")
    ssd = steps[steps.run == "ssd_r8_preempt"]
    assert (ssd.ssd_read_bytes > 0).any() and (ssd.ssd_read_bytes > 0).sum() == (ssd.ext_tokens > 0).sum()
    assert ssd.ssd_write_bytes.sum() > 0 and steps[steps.run != "ssd_r8_preempt"].ssd_write_bytes.sum() == 0
    assert env["ssd"]["ssd_r8_preempt"]["o_direct"] is False   # the tiny model's 256-byte token rows


def test_a_turns_ttft_splits_into_the_wait_and_its_first_token_step():
    import pandas as pd
    from gpu.batched_validate import phase_summary
    # measured: turn arrives at 1.0, waits for the step in flight (ends 1.004), its step 1.004-1.014:
    # TTFT 14 ms; simulated: it arrives at a step boundary (no wait), its step takes 12 ms
    mt = pd.DataFrame({"session_id": ["a"], "turn": [0], "arrival_s": [1.0], "first_token_s": [1.014],
                       "ttft_s": [0.014]})
    ms = pd.DataFrame({"start_s": [0.994, 1.004], "end_s": [1.004, 1.014]})
    stt = pd.DataFrame({"session_id": ["a"], "turn": [0], "arrival_s": [1.0], "first_token_s": [1.012],
                        "ttft_s": [0.012]})
    ss = pd.DataFrame({"start_s": [0.990, 1.0], "end_s": [1.0, 1.012]})
    got = phase_summary(mt, ms, stt, ss)
    assert got["ft_step_mape"] == pytest.approx(2 / 10)            # 12 vs 10 ms
    assert got["ttft_mape_same_wait"] == pytest.approx(2 / 14)     # the measured 4 ms wait kept
    assert got["wait_mean_meas_s"] == pytest.approx(0.004) and got["wait_mean_sim_s"] == pytest.approx(0.0)
    assert got["wait_abs_diff_s"] == pytest.approx(0.004)


def test_serve_sessions_times_collections_inside_steps(model):
    """A collection run inside a step is counted in that step's gc_ms (and in its wall time), and the
    timing callback is gone after the serve."""
    import gc
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=60, max_num_batched_tokens=32, block_tokens=BT,
                                           prefix_caching=False))

    class CollectingClock(FakeClock):
        def __call__(self):
            gc.collect()          # every reading of the clock (several inside each step) collects
            return super().__call__()

    clk = CollectingClock()
    res = serve_sessions(ex, sched, {"a": [(0.0, math.nan, 9, 4)]}, clock=clk, sleep=clk.sleep)
    assert len(res.steps) == 4                       # one prefill step, three decodes
    assert all(s.gc_ms > 0.0 for s in res.steps)
    assert not [c for c in gc.callbacks if getattr(c, "__name__", "") == "on_gc"]


def test_device_script_cpu_smoke_runs_llama2_7b_multi_head_attention_with_the_ssd_tier(tmp_path):
    """--model llama2-7b: the smoke's tiny shape keeps its multi-head attention (as many KV heads as query
    heads), the SSD tier serves its host run, and LLaMA-2-7B's cost model (the roofline here) prices them."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    import pandas as pd
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/gpu_batched_validate.py", "--cpu-smoke", "--model", "llama2-7b",
                        "--policies", "hbm", "--host-runs", "ssd", "--no-calibration", "--graph-bench-shapes", "",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from gpu.model import TINY
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["model"] == TINY.name and TINY.kv_heads == TINY.heads and set(env["ssd"]) == {"ssd_r8_preempt"}
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert set(steps.model) == {"tiny"} and steps[steps.run == "ssd_r8_preempt"].ssd_write_bytes.sum() > 0
    summary = json.loads((tmp_path / "compare.json").read_text())["roofline"]
    assert summary["model"] == "llama2-7b"
    assert set(summary["runs"]) == {"hbm_r8", "hbm_r8_preempt", "ssd_r8_preempt", "hbm_r4"}
    assert all(v["turns_matched"] == v["turns_meas"] > 0 for v in summary["runs"].values())
