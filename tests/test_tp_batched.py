"""The batched executor under tensor parallelism (gpu/tp_batched.py) on CPU: two gloo processes, each holding
its shard of a tiny GQA model (tests/tp_batched_ranks.py runs the ranks' side).

The sharded ranks' logits over prefill chunks, decodes and a prefix-cache hit equal one process's with the
unsharded weights (eager and static-shape bodies; GQA and a single replicated KV head); served sessions give
every rank the same steps at the same (rank 0's) times; a rank that plans otherwise is caught before its step."""
import math
import os

import pytest
import torch

from gpu.tp_batched import ShmSync, plan_digest, tokens_digest
from gpu.tp_layer import TINY_GQA, kv_heads_per_rank, rank_shape

import tp_batched_ranks as R

dist = pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp
    from gpu.tp_bench import free_port
    out = tmp_path_factory.mktemp("tp_batched")
    shm = ShmSync.create(2)
    try:
        mp.spawn(R.worker, args=(2, free_port(), shm, str(out)), nprocs=2, join=True)
    except Exception as exc:   # noqa: BLE001 - a sandbox without sockets or process spawning
        pytest.skip(f"two gloo processes could not run here: {exc!r}"[:300])
    finally:
        os.unlink(shm)
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for g in got:
        assert "error" not in g, g["error"]
    return got


@pytest.mark.parametrize("shape", [TINY_GQA, R.ONE_KV], ids=["gqa", "one_kv_head"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_tp2_logits_equal_the_unsharded_executors_over_chunks_decodes_and_a_prefix_hit(ranks, shape, graphs):
    ref, ref_shapes, hit = R.scripted_logits(R.make_executor(shape, 40, decode_graphs=graphs))
    # the script really mixes chunks with decodes and ends on a prefix hit: request 0's 13 + 5 tokens had
    # 17 computed, 4 whole blocks of 4 cached
    assert any(len(s) > 1 and any(n > 1 for n, _ in s) for s in ref_shapes)
    assert hit == 16
    for r in range(2):
        logits, shapes, _ = ranks[r][(shape.name, graphs)]
        assert shapes == ref_shapes
        assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4), float((logits - ref).abs().max())
        # each rank's KV pool holds its own KV heads: 4 / 2, or the one head replicated
        assert ranks[r][(shape.name, graphs, "kv_heads")] == (2 if shape is TINY_GQA else 1)
    # both ranks sample from the same logits: equal bit for bit
    assert torch.equal(ranks[0][(shape.name, graphs)][0], ranks[1][(shape.name, graphs)][0])


@pytest.mark.parametrize("sync", ["shm", "gloo"])
def test_ranks_serve_the_same_steps_at_rank_zeros_times(ranks, sync):
    steps0, turns0 = ranks[0][("served", sync)]
    steps1, turns1 = ranks[1][("served", sync)]
    assert steps0 == steps1 and turns0 == turns1         # times included: one clock
    assert len(turns0) == 6 and all(math.isfinite(t[3]) for t in turns0)
    assert any(d > 1 for _, _, d, _, _ in steps0)       # a decode batch formed


@pytest.mark.parametrize("sync", ["shm", "gloo"])
def test_a_rank_that_plans_another_step_fails_on_every_rank_before_the_step(ranks, sync):
    for r in range(2):
        got = ranks[r][("diverged", sync)]
        assert got is not None, f"rank {r} served a diverged schedule without noticing"
        msg, steps = got
        # the first step differs (an 11-token prompt: one chunk under 12 tokens, 8 + 3 under 8): its check
        # raised before it ran (no step counted)
        assert "differs" in msg and steps == 0


def test_plan_digest_changes_with_any_decision_and_tokens():
    from sim.scheduler import Scheduled, SeqRequest, StepPlan
    r = SeqRequest("a", 9, 2, lambda i: ("a", i))
    r.blocks, r.num_computed_tokens = [5, 2, 9], 4

    def plan(n=5, blocks=None, free=7):
        if blocks is not None:
            r.blocks = blocks
        return StepPlan([Scheduled(r, n, False)], [], {}, free)
    base = plan_digest(0, plan())
    assert plan_digest(0, plan()) == base                            # deterministic
    assert plan_digest(0, plan(n=4)) != base                         # another chunk
    assert plan_digest(0, plan(free=6)) != base                      # another pool state
    assert plan_digest(0, plan(blocks=[5, 2, 8])) != base            # another block for the new K/V
    assert tokens_digest(base, [3]) != tokens_digest(base, [4]) and tokens_digest(base, []) == base


def test_rank_shape_splits_heads_and_replicates_a_kv_head_over_more_ranks():
    s = rank_shape(TINY_GQA, 2)     # 8 query heads, 4 KV heads, 96 MLP columns
    assert (s.heads, s.kv_heads, s.intermediate, s.head_dim) == (4, 2, 48, 8)
    assert kv_heads_per_rank(TINY_GQA, 4) == 1 and kv_heads_per_rank(R.ONE_KV, 2) == 1
    # 12 heads and 96 MLP columns split over 6 ranks; 4 KV heads cannot be replicated evenly over them
    odd = TINY_GQA.__class__("odd", 2, 96, 12, 4, 96, 101, 512)
    with pytest.raises(ValueError, match="kv_heads 4 cannot be replicated evenly over tp=6"):
        kv_heads_per_rank(odd, 6)
