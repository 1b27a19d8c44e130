"""Grouped-query attention and tensor-parallel shards in the executor's decoder (gpu/model.py), on CPU.

The GQA layer is checked against attention written out by hand (each query head reads KV head
h // group); the padded prefill graph body and the decode graph body against `layer_forward`; the
executor's reuse paths against recompute; TP shards joined by an all-reduce against the full model.
"""
import threading

import torch
import torch.nn.functional as F

from gpu import model as M
from gpu.decode_graph import DecodeGraphs
from gpu.executor import Executor, prompt_ids
from gpu.plans import ServePlan
from gpu.prefill_graph import PrefillGraphs
from sim.costmodel import PrefillPadding

S = M.TINY_GQA          # 8 query heads over 2 KV heads: groups of 4


def _by_hand(model, li, x, start):
    """One layer, attention written out: K, V repeated per query head, softmax over visible keys."""
    s, w = model.shape, model.layers[li]
    B, n, _ = x.shape
    D, hq, hkv = s.head_dim, s.heads, s.kv_heads
    qkv = M.rms_norm(x, w.attn_norm) @ w.wqkv.T
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    cos = model.rope_cos[:start + n].view(1, start + n, 1, D)
    sin = model.rope_sin[:start + n].view(1, start + n, 1, D)
    q = M.rotate_half(q.view(B, n, hq, D), cos[:, start:], sin[:, start:])
    k = M.rotate_half(k.view(B, n, hkv, D), cos[:, start:], sin[:, start:])
    k = k.repeat_interleave(hq // hkv, dim=2).transpose(1, 2)      # [B, hq, n, D]
    v = v.view(B, n, hkv, D).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)
    scores = q.transpose(1, 2) @ k.transpose(-1, -2) / D ** 0.5
    visible = torch.arange(n).view(1, n) <= torch.arange(n).view(n, 1)
    o = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, n, hq * D)
    h = x + o @ w.wo.T
    g, u = (M.rms_norm(h, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
    return h + (F.silu(g) * u) @ w.w2.T


def test_gqa_layer_matches_attention_written_out_by_hand():
    model = M.random_decoder(S, 64, "cpu", torch.float64, seed=4)
    x = torch.randn(2, 7, S.hidden, dtype=torch.float64)
    cache = torch.zeros(2, 16, 2, S.kv_heads, S.head_dim, dtype=torch.float64)
    torch.testing.assert_close(M.layer_forward(model, 0, x, cache, 0), _by_hand(model, 0, x, 0))


def test_gqa_padded_prefill_and_graphed_decode_match_the_eager_layers():
    model = M.random_decoder(S, 256, "cpu", torch.float64, seed=5)
    hist, n = 11, 5
    ref = torch.zeros(S.layers, 1, 64, 2, S.kv_heads, S.head_dim, dtype=torch.float64)
    ids = torch.randint(0, S.vocab, (1, hist + n))
    x = M.embed(model, ids[:, :hist])
    for i in range(S.layers):
        x = M.layer_forward(model, i, x, ref[i], 0)
    cache = ref.clone()
    x = M.embed(model, ids[:, hist:])
    for i in range(S.layers):
        x = M.layer_forward(model, i, x, ref[i], hist)
    want_logits = M.head(model, x[:, -1])
    # padded shape: 5 new tokens run as 16 after 11 cached ones, over 32 keys (the mask hides the padding)
    pg = PrefillGraphs(model, 16, graphs=False, padding=PrefillPadding((16,), 32))
    assert pg.group == 4 and pg.shape_for(n, hist) == (16, 32)
    pg.begin(ids[:, hist:], hist, cache)
    for i in range(S.layers):
        pg.layer(i)
    logits, tok = pg.end()
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(cache[:, :, :hist + n], ref[:, :, :hist + n])
    # one decode step at position 16 over a bucket of 32 keys, against the eager decode step
    dg = DecodeGraphs(model, [cache], bucket=32, graphs=False)
    dg.cur.copy_(tok.view(1, 1))
    got = dg.step(0, hist + n).clone()
    want = M.decode_step(model, tok.view(1, 1), ref, hist + n)
    assert torch.equal(got, want)
    torch.testing.assert_close(cache[:, :, :hist + n + 1], ref[:, :, :hist + n + 1])


def test_gqa_executor_reuse_from_dram_equals_recompute(tmp_path):
    model = M.random_decoder(S, 1024, "cpu", torch.float32, seed=6)
    firsts = {}
    for plan in (ServePlan("recompute"), ServePlan("dram", overlap=True)):
        ex = Executor(model, plan, max_ctx=128, max_new=64, host_bytes=1 << 22, poison=True, graph_bucket=32)
        ex.open_session("s", 128)
        out = []
        for k, (p, o) in enumerate([(9, 5), (13, 4), (21, 3)]):
            t = ex.run_turn("s", k, prompt_ids("s", k, p, S.vocab), o, 0.0, 0.0)
            assert torch.isfinite(ex.last_logits).all()
            out.append((t.first_token, ex.last_logits.clone()))
        ex.close()
        firsts[plan.tier] = out
    for (a, la), (b, lb) in zip(firsts["dram"], firsts["recompute"]):
        assert a == b
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def _thread_allreduce(n):
    """An in-place all-reduce among n threads (ranks): every rank gets the same sum, in rank order."""
    slots, barrier = [None] * n, threading.Barrier(n)

    def make(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            t.copy_(total)
        return reduce
    return [make(r) for r in range(n)]


def test_tp_shards_joined_by_an_all_reduce_decode_as_the_full_model():
    full = M.random_decoder(S, 256, "cpu", torch.float64, seed=7)
    ids = torch.randint(0, S.vocab, (1, 9))
    want_cache = torch.zeros(S.layers, 1, 32, 2, S.kv_heads, S.head_dim, dtype=torch.float64)
    x = M.embed(full, ids)
    for i in range(S.layers):
        x = M.layer_forward(full, i, x, want_cache[i], 0)
    want = M.head(full, x[:, -1])
    tp = 2
    got, caches = [None] * tp, [None] * tp

    def rank_run(r, reduce):
        m = M.shard_decoder(full, r, tp, reduce)
        cache = torch.zeros(S.layers, 1, 32, 2, S.kv_heads // tp, S.head_dim, dtype=torch.float64)
        y = M.embed(m, ids)
        for i in range(S.layers):
            y = M.layer_forward(m, i, y, cache[i], 0)
        got[r], caches[r] = M.head(m, y[:, -1]), cache
    threads = [threading.Thread(target=rank_run, args=(r, red)) for r, red in enumerate(_thread_allreduce(tp))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(tp):
        torch.testing.assert_close(got[r], want)
        # each rank's cache holds its own KV heads: rank r has heads [r, r + 1) of 2
        torch.testing.assert_close(caches[r], want_cache[:, :, :, :, r:r + 1])
