"""Pure-decode steps at static shapes (gpu/batched_decode.py), run eagerly on CPU: the body a CUDA graph
captures on the GPU. Padded to batch and packed-context buckets, it must give the executor's logits
(a one-pass recompute), write K/V only to the real rows' new slots and the scratch slot, and never
read a block a request does not own (the free blocks are NaN-poisoned)."""
import dataclasses
import math

import pytest
import torch

from gpu.batched import BatchedExecutor, block_table, random_model, reference_logits
from gpu.batched_decode import BATCH_BUCKETS, token_buckets
from gpu.tp_layer import TINY_GQA
from sim.scheduler import ChunkedConfig, ChunkedScheduler, Scheduled, SeqRequest, StepPlan

from tiny_batched import BT, ids, run_logits, scheduler_and_executor, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_token_buckets_grow_by_sqrt2_rounded_to_16():
    # 64, 64*1.414 = 90.5 -> 96, 128, 181 -> 192, 256 (the first at or past 200)
    assert token_buckets(200) == [64, 96, 128, 192, 256]
    assert BATCH_BUCKETS[0] == 1 and BATCH_BUCKETS[-1] == 256


def test_a_step_pads_to_the_next_batch_and_packed_context_bucket(model):
    ex = BatchedExecutor(model, num_blocks=40, block_tokens=BT, decode_graphs=True)
    st = ex.static
    # 3 rows -> batch bucket 4; 5 + 7 + 9 keys + 1 for the padded row = 22 -> 64
    assert st.key([5, 7, 9]) == (4, 0, 64)
    # 65 keys for one row -> 96; 200 rows of 1 key plus 56 padded rows: 256 -> 256
    assert st.key([65]) == (1, 0, 96)
    assert st.key([1] * 200) == (256, 0, 256)
    # a context past the rotary tables (512 positions): no bucket, the eager path runs it
    assert st.key([513]) is None
    assert st.key([1] * 257) is None


def decode_plan(ex, specs, seed=0):
    """Requests with `prompt` tokens, `out` of them sampled outputs, all but the last computed, on
    distinct blocks: a pure-decode plan."""
    free = list(range(1, ex.k.shape[1]))[::-1]
    sched, reqs = [], []
    for k, (prompt, out) in enumerate(specs):
        r = SeqRequest(("d", k), prompt, 100, lambda i, k=k: (k, i))
        r.num_output_tokens = out
        n = prompt + out
        r.blocks = [free.pop() for _ in range(-(-n // BT))]
        r.num_computed_tokens = n - 1
        ex.tokens[r] = ids(seed + k, n)
        reqs.append(r)
        sched.append(Scheduled(r, 1, True))
    return StepPlan(sched, [], {}, 0), reqs


def prefill_kv(ex, reqs):
    """Write each request's K/V of its computed tokens by running its prefill eagerly (chunk steps)."""
    for r in reqs:
        c = r.num_computed_tokens
        r.num_computed_tokens = 0
        ex.run(StepPlan([Scheduled(r, c, False)], [], {}, 0))
        ex.tokens[r] = ex.tokens[r][:c + 1]   # drop what that chunk sampled
        r.num_computed_tokens = c


def test_static_decode_equals_recompute_and_touches_only_its_slots(model):
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, poison=True, decode_graphs=True)
    plan, reqs = decode_plan(ex, [(9, 3), (13, 1), (5, 6)], seed=7)
    prefill_kv(ex, reqs)
    known = {r: list(ex.tokens[r]) for r in reqs}
    k0, v0 = ex.k.clone(), ex.v.clone()
    before = ex.static.eager_steps     # the prefill chunks ran at static shapes too
    out = ex.run(plan, keep_logits=True)
    assert out.graph and ex.static.eager_steps == before + 1
    for row, r in enumerate(reqs):
        last = r.num_computed_tokens
        ref = reference_logits(model, known[r][:last + 1])[last]
        assert torch.isfinite(out.logits[row]).all()
        assert torch.allclose(out.logits[row], ref, rtol=1e-4, atol=1e-4)
        assert out.sampled[r] == int(ref.argmax())
    # 3 rows in a bucket of 4: the real rows' new slots changed, and the scratch slot 0 (the padded
    # row's), nothing else
    want = {(block_table(r)[r.num_computed_tokens // BT], r.num_computed_tokens % BT) for r in reqs} | {(0, 0)}
    for new, old in ((ex.k, k0), (ex.v, v0)):
        changed = ((new != old) & ~(new.isnan() & old.isnan())).flatten(3).any(-1).any(0)   # [blocks, bt]
        assert {tuple(x) for x in changed.nonzero().tolist()} == want


def test_static_and_eager_paths_give_the_same_steps_under_the_scheduler(model):
    """The scheduler's own plans (chunked prefill, then pure-decode steps of 1-3 requests, padded),
    with prefix caching and poisoned free blocks: every row equals a recompute on both paths."""
    logits = {}
    for graphs in (False, True):
        sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=40, max_num_batched_tokens=10,
                                               block_tokens=BT))
        ex = BatchedExecutor(model, num_blocks=40, block_tokens=BT, poison=True, decode_graphs=graphs)
        for k, (p, o) in enumerate([(13, 7), (7, 9), (22, 4)]):
            r = SeqRequest(k, p, o, lambda i, k=k: (k, i))
            ex.add(r, ids(10 + k, p))
            sched.add_request(r)
        rows, static_steps = [], 0
        while sched.has_unfinished():
            plan = sched.schedule()
            known = {r: list(ex.tokens[r]) for r, _, _ in plan.scheduled}
            out = ex.run(plan, keep_logits=True)
            static_steps += out.graph
            for row, (r, n, _) in enumerate(plan.scheduled):
                last = r.num_computed_tokens + n - 1
                ref = reference_logits(model, known[r][:last + 1])[last]
                assert torch.allclose(out.logits[row], ref, rtol=1e-4, atol=1e-4), (graphs, r.id, last)
            rows.append(out.logits)
            sched.update(plan)
        logits[graphs] = torch.cat(rows)
        assert (static_steps > 0) == graphs
    assert torch.allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_a_row_reading_past_its_context_is_caught_by_the_poison(model):
    """The checks above can fail: a length one past the row's KV attends its unwritten (NaN) next slot."""
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, poison=True, decode_graphs=True)
    _, reqs = decode_plan(ex, [(9, 2), (6, 1)], seed=3)
    prefill_kv(ex, reqs)
    st = ex.static
    ctxs = [r.num_computed_tokens + 1 for r in reqs]
    tables = [block_table(r) for r in reqs]
    toks = [ex.tokens[r][c - 1] for r, c in zip(reqs, ctxs)]
    # row 0 claims one more token: it attends position 11, whose K/V no step wrote (NaN), while row 1
    # stays finite
    bad = [ctxs[0] + 1, ctxs[1]]
    st.run(st.key(bad), toks, bad, tables)
    assert st.logits[0].isnan().all() and torch.isfinite(st.logits[1]).all()
    st.run(st.key(ctxs), toks, ctxs, tables)   # the true lengths: position 11 is written first
    assert torch.isfinite(st.logits[:2]).all()


def test_a_step_past_the_largest_bucket_runs_eagerly(model):
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, decode_graphs=True)
    ex.static.padding = dataclasses.replace(ex.static.padding, batch=(1, 2))   # as if 2 were the largest
    plan, reqs = decode_plan(ex, [(5, 1), (6, 1), (7, 1)])
    prefill_kv(ex, reqs)
    before = ex.static.eager_steps
    out = ex.run(plan)
    assert not out.graph and ex.static.eager_steps == before
    assert set(out.sampled) == set(reqs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_graphs_equal_eager_steps():
    m = random_model(TINY_GQA, 512, "cuda", torch.bfloat16, seed=3)
    outs = {}
    for graphs in (False, True):
        sched, ex = scheduler_and_executor(m, 60, 40, True, [(37, 9), (70, 12), (20, 5)], 50, block_tokens=16,
                                           poison=False, attention="flash_varlen", decode_graphs=graphs)
        outs[graphs] = run_logits(sched, ex)
        if graphs:
            assert ex.static.replays > 0 and not ex.static.failed
    err = (outs[True] - outs[False]).norm() / outs[False].norm()
    assert math.isfinite(err) and err < 2e-2


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: the capture runs the body (as a real capture only
    records it); `replay` runs the body of the key it was captured under."""
    static = None

    def replay(self):
        st = FakeGraph.static
        st.body(*next(k for k, g in st.captured.items() if g is self))


def test_the_capture_path_runs_with_fake_cuda_graphs(model, monkeypatch):
    """The graph bookkeeping (capture ahead, the key of a step, replay into the static outputs) on CPU,
    with torch.cuda's graph calls replaced: run 17's device call lost its graphs to an AttributeError
    in this path, which no CPU test reached."""
    import contextlib
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(cuda, "Stream", lambda: type("S", (), {"wait_stream": lambda self, o: None})())
    monkeypatch.setattr(cuda, "current_stream", lambda: type("S", (), {"wait_stream": lambda self, o: None})())
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
    modes = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        modes.append(capture_error_mode)
        yield
    monkeypatch.setattr(cuda, "graph", graph)
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, poison=True, decode_graphs=True)
    st = ex.static
    st.graphs = True                       # as on CUDA
    FakeGraph.static = st
    assert st.capture(keys=[(4, 0, 64)]) == 1 and st.failed is None and modes == ["global"]
    plan, reqs = decode_plan(ex, [(9, 3), (13, 1), (5, 6)], seed=7)
    # three chunk steps of 11, 13 and 10 new tokens: one shape (16 chunk tokens, 64 keys), captured by
    # the first when used, replayed by all three
    prefill_kv(ex, reqs)
    assert st.captured_in_run == 1 and st.replays == 3 and (0, 16, 64) in st.captured
    known = {r: list(ex.tokens[r]) for r in reqs}
    out = ex.run(plan, keep_logits=True)
    assert out.graph and out.key == (4, 0, 64) and not out.captured
    assert st.replays == 4 and st.eager_steps == 0 and st.captured_in_run == 1
    for row, r in enumerate(reqs):
        last = r.num_computed_tokens
        ref = reference_logits(model, known[r][:last + 1])[last]
        assert torch.allclose(out.logits[row], ref, rtol=1e-4, atol=1e-4)


def test_a_mixed_step_at_its_static_shape_equals_recompute_and_touches_only_its_slots(model):
    """Two decode rows and two prefill chunks (one after 8 cached tokens, one from scratch) in one
    padded step: batch bucket 2, 7 + 5 = 12 chunk tokens -> 16 (4 padding tokens), keys 10 + 7 (decodes)
    + 15 + 5 (chunks) + 4 (padding) = 41 -> 64. Every real row equals a one-pass recompute; K/V change
    only at the new tokens' slots and the scratch slot; free blocks stay NaN (never read)."""
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, poison=True, decode_graphs=True)
    plan, reqs = decode_plan(ex, [(8, 2), (6, 1)], seed=11)
    prefill_kv(ex, reqs)
    free = [b for b in range(1, 60) if b not in {x for r in reqs for x in r.blocks}][::-1]
    chunks = []
    for k, (prompt, cached, new) in enumerate([(15, 8, 7), (9, 0, 5)]):
        r = SeqRequest(("c", k), prompt, 10, lambda i, k=k: ("c", k, i))
        r.blocks = [free.pop() for _ in range(-(-(cached + new) // BT))]
        ex.tokens[r] = ids(40 + k, prompt)
        if cached:
            r.num_computed_tokens = 0
            ex.run(StepPlan([Scheduled(r, cached, False)], [], {}, 0))
            ex.tokens[r] = ex.tokens[r][:prompt]
        r.num_computed_tokens = cached
        chunks.append((r, new))
    plan = StepPlan(plan.scheduled + [Scheduled(r, n, False) for r, n in chunks], [], {}, 0)
    known = {sc.req: list(ex.tokens[sc.req]) for sc in plan.scheduled}
    k0 = ex.k.clone()
    out = ex.run(plan, keep_logits=True)
    assert out.graph and out.key == (2, 16, 64)
    for row, (r, n, _) in enumerate(plan.scheduled):
        last = r.num_computed_tokens + n - 1
        ref = reference_logits(model, known[r][:last + 1])[last]
        assert torch.allclose(out.logits[row], ref, rtol=1e-4, atol=1e-4), r.id
    # the first chunk ends at 15 of 15 prompt tokens: it samples; the second (5 of 9) does not
    assert chunks[0][0] in out.sampled and chunks[1][0] not in out.sampled
    want = set()
    for r, n, _ in plan.scheduled:
        for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
            want.add((block_table(r)[p // BT], p % BT))
    changed = ((ex.k != k0) & ~(ex.k.isnan() & k0.isnan())).flatten(3).any(-1).any(0)
    # the scratch slot holds token 0 at position 0 whichever padded row wrote it last (an earlier
    # padded step left the same value there)
    assert {tuple(x) for x in changed.nonzero().tolist()} - {(0, 0)} == want


def test_more_chunks_than_slots_run_eagerly(model):
    ex = BatchedExecutor(model, num_blocks=60, block_tokens=BT, decode_graphs=True)
    st = ex.static
    assert st.key([], [(3, 0)] * st.padding.chunk_slots) is not None
    assert st.key([], [(3, 0)] * (st.padding.chunk_slots + 1)) is None
