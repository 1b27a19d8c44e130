"""Reused KV gives the same outputs as recomputing it, on CPU with tiny shapes.

Every reuse path (HBM hit, DRAM sync, DRAM layer-wise overlapped, SSD sync and overlapped) is run with
poisoned buffers: working caches and the SSD bounce buffer are filled with NaN before each turn, so a
layer whose history was not loaded turns the logits into NaN instead of passing silently.
"""
import math

import pandas as pd
import pytest
import torch

from gpu import model as M
from gpu.executor import Executor, prompt_ids, serve_trace, turn_shapes
from gpu.plans import PLANS as RUN_PLANS
from gpu.plans import ServePlan
from gpu.prefill_graph import PrefillGraphs

TURNS = [(9, 5), (13, 4), (1, 6), (21, 3)]   # (prompt tokens, output tokens) of one session
SHAPE = M.TINY
# every reusing plan the device runs, and a read buffer of one layer (nothing overlaps)
PLANS = {**{name: plan for name, plan in RUN_PLANS.items() if plan.tier != "recompute"},
         "dram_overlap_n1": ServePlan("dram", overlap=True, read_buffer_layers=1)}


@pytest.fixture(scope="module")
def tiny_model():
    return M.random_decoder(SHAPE, max_pos=1024, device="cpu", dtype=torch.float32, seed=3)


def _serve(model, plan, tmp_path, fault_layer=None, fault_turn=None, decode="graph"):
    ex = Executor(model, plan, max_ctx=128, max_new=64, host_bytes=1 << 22, ssd_dir=tmp_path, poison=True,
                  decode=decode, graph_bucket=32)
    ex.open_session("s", 128)
    logits, tokens = [], []
    for k, (p, o) in enumerate(TURNS):
        t = ex.run_turn("s", k, prompt_ids("s", k, p, SHAPE.vocab), o, 0.0, 0.0,
                        fault_skip_layer=fault_layer if k == fault_turn else None)
        logits.append(ex.last_logits.clone())
        tokens.append(t.first_token)
    ex.drain()
    ex.close()
    return logits, tokens, ex.sessions["s"].tokens


@pytest.fixture(scope="module")
def recomputed(tiny_model, tmp_path_factory):
    return _serve(tiny_model, ServePlan("recompute"), tmp_path_factory.mktemp("rc"))


@pytest.mark.parametrize("name", sorted(PLANS))
def test_reused_kv_matches_recompute(name, tiny_model, recomputed, tmp_path):
    ref_logits, ref_first, ref_tokens = recomputed
    logits, first, tokens = _serve(tiny_model, PLANS[name], tmp_path)
    for k, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.isfinite(a).all(), f"turn {k}: NaN logits, some layer read poisoned KV"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert first == ref_first
    assert tokens == ref_tokens


@pytest.mark.parametrize("name", ["dram_sync", "dram_overlap", "ssd_overlap"])
def test_a_layer_left_unloaded_poisons_the_output(name, tiny_model, tmp_path):
    logits, _, _ = _serve(tiny_model, PLANS[name], tmp_path, fault_layer=2, fault_turn=2)
    assert torch.isfinite(logits[1]).all()
    assert not torch.isfinite(logits[2]).all()


def test_history_grows_by_prompt_and_reply(tiny_model, tmp_path):
    ex = Executor(tiny_model, ServePlan("dram"), max_ctx=128, max_new=64, host_bytes=1 << 22)
    ex.open_session("s", 128)
    t0 = ex.run_turn("s", 0, [1, 2, 3], 4, 0.0, 0.0)
    t1 = ex.run_turn("s", 1, [4, 5], 2, 0.0, 0.0)
    # Turn 1 reuses turn 0's prompt and the 3 reply tokens decoded from it; the last reply token
    # of turn 0 is prefilled with turn 1's prompt.
    assert (t0.history_tokens, t0.new_tokens) == (0, 3)
    assert (t1.history_tokens, t1.new_tokens) == (3 + 3, 1 + 2)
    assert len(ex.sessions["s"].tokens) == 3 + 4 + 2 + 2


def test_serve_trace_replays_arrivals_fcfs_and_think_time(tiny_model):
    trace = pd.DataFrame({
        "session_id": ["a", "a", "b"], "turn": [0, 1, 0],
        "arrival_s": [0.0, math.nan, 0.0], "think_s": [math.nan, 0.05, math.nan],
        "prompt_tokens": [5, 4, 6], "output_tokens": [2, 2, 3],
    })
    ex = Executor(tiny_model, ServePlan("dram"), max_ctx=128, max_new=64, host_bytes=1 << 22)
    out = serve_trace(ex, trace)
    assert list(zip(out.session_id, out.turn)) == [("a", 0), ("b", 0), ("a", 1)]
    b0 = out.iloc[1]
    assert b0.start_s >= out.iloc[0].end_s            # one turn at a time: b queued behind a
    assert b0.queue_s > 0
    a1 = out.iloc[2]
    assert a1.arrival_s == pytest.approx(out.iloc[0].end_s + 0.05)
    assert (out.ttft_s >= 0).all() and (out.first_token_s <= out.end_s).all()


def test_graph_shaped_decode_matches_eager_decode(tiny_model, tmp_path):
    # On CPU the graph body runs eagerly: masked fixed-size buckets, device-side position and
    # index_copy_ must give the same tokens as the plain eager decode.
    _, _, graph_tokens = _serve(tiny_model, PLANS["dram_overlap"], tmp_path, decode="graph")
    _, _, eager_tokens = _serve(tiny_model, PLANS["dram_overlap"], tmp_path, decode="eager")
    assert graph_tokens == eager_tokens


@pytest.mark.parametrize("tier", ["recompute", "dram", "hbm"])
def test_shapes_prepared_before_a_trace_are_the_shapes_its_turns_run(tier, tiny_model):
    # serve_trace captures graphs from turn_shapes before its clock starts: a wrong prediction would
    # put a capture (seconds on a GPU) inside some turn's TTFT
    trace = pd.DataFrame({"session_id": ["a"] * 4 + ["b"] * 2, "turn": [0, 1, 2, 3, 0, 1],
                          "arrival_s": [0.0] + [math.nan] * 3 + [0.0, math.nan],
                          "think_s": [math.nan, 0.0, 0.0, 0.0, math.nan, 0.0],
                          "prompt_tokens": [5, 4, 1, 7, 6, 2], "output_tokens": [2, 1, 3, 2, 3, 4]})
    ex = Executor(tiny_model, ServePlan(tier), max_ctx=128, max_new=64, host_bytes=1 << 22)
    out = serve_trace(ex, trace)
    for sid, g in trace.groupby("session_id"):
        served = out[out.session_id == sid].sort_values("turn")
        assert list(zip(served.history_tokens, served.new_tokens)) == turn_shapes(tier, g.prompt_tokens,
                                                                                  g.output_tokens)


@pytest.mark.parametrize("hist, n", [(0, 7), (0, 16), (9, 5), (40, 17)])
def test_padded_prefill_equals_the_unpadded_eager_layers(tiny_model, hist, n):
    # padding adds query rows after the real ones and masked keys past them: the real rows' outputs
    # must not change (the bodies captured on a GPU are these, run eagerly)
    torch.manual_seed(hist + n)
    ctx = 512
    ref_cache = torch.randn(SHAPE.layers, 1, ctx, 2, SHAPE.kv_heads, SHAPE.head_dim)
    cache = ref_cache.clone()
    cache[:, :, hist:].fill_(1e4)      # stale finite garbage past the history, as a reused cache holds
    ids = torch.randint(0, SHAPE.vocab, (1, n))
    x = M.embed(tiny_model, ids)
    for i in range(SHAPE.layers):
        x = M.layer_forward(tiny_model, i, x, ref_cache[i], hist)
    ref_logits, ref_tok = M.prefill_head(tiny_model, x)
    pg = PrefillGraphs(tiny_model, 64)
    pg.begin(ids, hist, cache)
    assert pg.shape[0] > n or n == 16       # the tail really is padded
    for i in range(SHAPE.layers):
        pg.layer(i)
    logits, tok = pg.end()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(cache[:, :, :hist + n], ref_cache[:, :, :hist + n])
