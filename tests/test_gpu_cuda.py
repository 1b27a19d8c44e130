"""CUDA-only paths (graph capture, pinned registration); their logic is covered on CPU elsewhere."""
import pytest
import torch

from gpu import model as M
from gpu.decode_graph import DecodeGraphs
from gpu.prefill_graph import PrefillGraphs
from gpu.kvstore import aligned_host_bytes, unpin

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_captured_decode_graph_replays_the_eager_static_step():
    m = M.random_decoder(M.TINY, 128, "cuda", torch.float32, seed=5)
    caches = [torch.randn(4, 1, 64, 2, 4, 16, device="cuda")]
    g = DecodeGraphs(m, caches, bucket=32, graphs=True)
    # the capture's warm-up runs write position 0 of the cache: the eager side starts from that state
    ref = [c.clone() for c in caches]
    e = DecodeGraphs(m, ref, bucket=32, graphs=False)
    g.cur.fill_(3)
    e.cur.fill_(3)
    for pos in range(20, 40):
        assert torch.equal(g.step(0, pos), e.step(0, pos))


@cuda
def test_captured_prefill_graphs_replay_the_eager_bodies():
    m = M.random_decoder(M.TINY, 1024, "cuda", torch.float32, seed=6)
    base = torch.randn(4, 1, 512, 2, 4, 16, device="cuda")
    outs = {}
    for graphs in (True, False):
        pg = PrefillGraphs(m, 64, graphs=graphs)
        res = []
        for hist, n in ((0, 7), (30, 5), (30, 40), (100, 3)):     # shapes reused and new, both caches
            cache = base.clone()
            ids = torch.randint(0, 101, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
            pg.begin(ids, hist, cache)
            for i in range(4):
                pg.layer(i)
            logits, tok = pg.end()
            res.append((logits.clone(), tok.clone(), cache[:, :, :hist + n].clone()))
        outs[graphs] = res
        assert (pg.captures > 0) == graphs
    for (a, ta, ca), (b, tb, cb) in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b)
        assert torch.equal(ta, tb)
        torch.testing.assert_close(ca, cb)


@cuda
def test_registered_host_memory_is_pinned():
    t = aligned_host_bytes(1 << 20, pinned=True)
    assert t.is_pinned() and t.data_ptr() % 4096 == 0
    unpin(t)


def test_graph_body_runs_a_layer_stack_on_cpu():
    # the calibration times a stack of one layer repeated; on CPU the same body runs eagerly
    m = M.random_decoder(M.TINY, 64, "cpu", torch.float32, seed=1, layers=1)
    cache = torch.randn(1, 2, 64, 2, 4, 16)
    g = DecodeGraphs(m, [cache], batch=2, stack=[(0, 0)] * 3, buckets=[64])
    g.cur.copy_(torch.tensor([[1], [2]]))
    out = g.step(0, 63)
    assert out.shape == (2, 1) and torch.isfinite(cache[:, :, 63]).all()
