"""kvsim's chunked scheduler (vLLM V1 semantics) and its paged KV pool: a replay of vLLM's own
decisions (the committed fixture, bench/vllm_scheduler/README.md) and small hand-computed cases."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sim.blocks import BlockPool
from sim.errors import KvsimError
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "vllm_scheduler"))
import compare  # noqa: E402
import stream as st  # noqa: E402

DATA = ROOT / "tests" / "data"


def req(rid, prompt, max_tokens, keys=None):
    """A request whose blocks are its own (key (rid, i)) unless `keys` names shared ones."""
    return SeqRequest(rid, prompt, max_tokens, keys if keys is not None else (lambda i, r=rid: (r, i)))


def step(s):
    plan = s.schedule()
    finished = s.update(plan)
    return plan, finished


def rows(plan):
    return [(x.req.id, x.num_new_tokens, x.is_decode) for x in plan.scheduled]


# ---- vLLM's decisions, replayed ---------------------------------------------------------------

@pytest.mark.parametrize("pool,segments", [("runs", True), ("runs", False), ("exact", True), ("exact", False)])
def test_replay_of_vllm_fixture_is_identical_at_every_step(pool, segments):
    header, reqs = st.read_stream(DATA / "vllm_stream_small.jsonl")
    config, vllm_rows = compare.read_steps(DATA / "vllm_steps_small.jsonl")
    cfg = dataclasses.replace(compare.config_from_vllm(config), pool=pool)
    kv_rows, sched = compare.drive(header, reqs, cfg, segments=segments)
    result = compare.compare(vllm_rows, kv_rows)
    assert result["first_difference"] is None, json.dumps(result["first_difference"])
    assert result["identical"] == result["steps"] == 698
    # the fixture is worth replaying: it chunks, preempts and hits the prefix cache
    assert sched.stats.preemptions == 6
    assert compare.totals(kv_rows)["hit_tokens"] == 18_960


def test_comparison_sees_a_pool_one_block_larger_than_vllm_s():
    header, reqs = st.read_stream(DATA / "vllm_stream_small.jsonl")
    config, vllm_rows = compare.read_steps(DATA / "vllm_steps_small.jsonl")
    config = dict(config, usable_blocks=config["usable_blocks"] + 1)
    kv_rows, _ = compare.drive(header, reqs, compare.config_from_vllm(config))
    result = compare.compare(vllm_rows, kv_rows)
    assert result["identical"] < result["steps"]
    assert result["differing_fields"]["free_blocks"] > 0


# ---- the step rules, by hand ------------------------------------------------------------------

def test_budget_goes_to_running_decodes_first_and_a_chunk_takes_the_rest():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=100, max_num_batched_tokens=10, block_tokens=4))
    s.add_request(req("a", 4, 5))
    plan, _ = step(s)
    assert rows(plan) == [("a", 4, False)]  # the whole prompt; its logits give token 1
    s.add_request(req("b", 20, 3))
    # a decodes 1 token, b's prompt gets the other 9, then 9, then the last 2 (20 = 9 + 9 + 2)
    assert rows(step(s)[0]) == [("a", 1, True), ("b", 9, False)]
    assert rows(step(s)[0]) == [("a", 1, True), ("b", 9, False)]
    plan, _ = step(s)
    assert rows(plan) == [("a", 1, True), ("b", 2, False)]
    assert plan.num_scheduled_tokens == 3
    assert rows(step(s)[0]) == [("a", 1, True), ("b", 1, True)]


def test_a_prompt_is_chunked_over_three_steps_and_then_decodes():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=100, max_num_batched_tokens=8, block_tokens=4))
    r = req("a", 20, 2)
    s.add_request(r)
    seen = []
    for _ in range(3):
        plan = s.schedule()
        seen.append((plan.scheduled[0].num_new_tokens, r.num_computed_tokens, r.num_output_tokens))
        s.update(plan)
    assert seen == [(8, 0, 0), (8, 8, 0), (4, 16, 0)]
    assert r.num_output_tokens == 1 and r.num_computed_tokens == 20
    plan, finished = step(s)
    assert rows(plan) == [("a", 1, True)] and finished == [r]


def test_prefix_hit_is_whole_blocks_and_leaves_one_token_to_compute():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=100, max_num_batched_tokens=64, block_tokens=4))
    shared = lambda i: ("sys", i)  # noqa: E731
    s.add_request(req("a", 8, 1, shared))
    plan, finished = step(s)  # a computes 8 tokens: blocks 0 and 1 cached, then it ends
    assert plan.admitted == {plan.scheduled[0].req: 0} and [f.id for f in finished] == ["a"]
    # b's whole 8-token prompt is cached, but the hit stops at 7 tokens -> 1 whole block (4)
    # c (10 tokens) hits both blocks (8); d diverges after block 0 (4)
    s.add_request(req("b", 8, 2, shared))
    s.add_request(req("c", 10, 2, shared))
    s.add_request(req("d", 12, 2, lambda i: ("sys", i) if i == 0 else ("d", i)))
    plan, _ = step(s)
    assert {r.id: hit for r, hit in plan.admitted.items()} == {"b": 4, "c": 8, "d": 4}
    assert rows(plan) == [("b", 4, False), ("c", 2, False), ("d", 8, False)]


def test_admission_counts_free_cached_hit_blocks_as_needed():
    # a leaves 2 cached blocks in the free queue (3 free in all). b (13 tokens) hits both, and
    # needs 4 blocks for its whole sequence: 2 new + the 2 hit blocks it takes out of the queue > 3
    s = ChunkedScheduler(ChunkedConfig(num_blocks=3, max_num_batched_tokens=64, block_tokens=4))
    shared = lambda i: ("sys", i)  # noqa: E731
    s.add_request(req("a", 8, 1, shared))
    step(s)
    assert s.free_blocks == 3
    s.add_request(req("b", 13, 1, shared))
    plan = s.schedule()
    assert plan.scheduled == [] and plan.admitted == {}
    s.update(plan)
    # 12 tokens fit: 3 blocks, 2 of them hits
    s2 = ChunkedScheduler(ChunkedConfig(num_blocks=3, max_num_batched_tokens=64, block_tokens=4))
    s2.add_request(req("a", 8, 1, shared))
    step(s2)
    s2.add_request(req("b", 12, 1, shared))
    plan, _ = step(s2)
    assert {r.id: hit for r, hit in plan.admitted.items()} == {"b": 8}


def test_blocked_head_of_queue_blocks_every_request_behind_it():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=4, max_num_batched_tokens=64, block_tokens=4))
    s.add_request(req("a", 8, 10))
    step(s)  # a holds 2 of 4 blocks
    s.add_request(req("big", 12, 1))  # needs 3: never tried past
    s.add_request(req("small", 4, 1))  # would fit in 1
    plan, _ = step(s)
    assert rows(plan) == [("a", 1, True)] and plan.admitted == {}


def test_out_of_blocks_preempts_the_last_running_request_which_recomputes_later():
    # 6 blocks of 4 tokens; a, b, c hold 2 each after their 6-token prompts. At step 3 a needs a
    # third block (9 tokens): c, the last admitted, is preempted; b then takes c's other block.
    s = ChunkedScheduler(ChunkedConfig(num_blocks=6, max_num_batched_tokens=100, block_tokens=4))
    a, b, c = req("a", 6, 4), req("b", 6, 10), req("c", 6, 10)
    for r in (a, b, c):
        s.add_request(r)
    plan, _ = step(s)
    assert rows(plan) == [("a", 6, False), ("b", 6, False), ("c", 6, False)] and s.free_blocks == 0
    step(s)
    step(s)
    plan, finished = step(s)
    assert rows(plan) == [("a", 1, True), ("b", 1, True)]
    assert plan.preempted == [c] and plan.admitted == {} and plan.free_blocks == 0
    assert c.num_computed_tokens == 0 and c.num_output_tokens == 3 and s.waiting[0] is c
    assert finished == [a]  # a's 4th token: its 3 blocks go back
    assert s.stats.preemptions == 1 and s.stats.dropped_tokens == 8
    # c resumes: its own blocks were reused by a and b, so it recomputes prompt + 3 output tokens
    plan, _ = step(s)
    assert rows(plan) == [("b", 1, True), ("c", 9, False)]
    assert plan.admitted == {c: 0}
    # of those 9 tokens, the 8 it had computed are recompute; its 3rd output token never had KV
    assert c.num_output_tokens == 4 and s.stats.recomputed_tokens == 8


def test_max_num_seqs_caps_the_running_batch():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=100, max_num_batched_tokens=100, block_tokens=4,
                                       max_num_seqs=2))
    for rid, out in (("a", 2), ("b", 5), ("c", 5)):
        s.add_request(req(rid, 4, out))
    plan, _ = step(s)
    assert [r.id for r in plan.admitted] == ["a", "b"]
    plan, finished = step(s)
    assert [r.id for r in finished] == ["a"] and plan.admitted == {}
    plan, _ = step(s)
    assert [r.id for r in plan.admitted] == ["c"]


def test_free_queue_reuses_unkeyed_blocks_first_and_evicts_a_request_tail_first():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert blocks == [1, 2, 3] and pool.num_free == 1
    key = lambda i: ("s", i)  # noqa: E731
    assert pool.cache_full_blocks(blocks, 0, 2, key) == 2  # blocks 1, 2 full; 3 partly filled
    pool.free_blocks(reversed(blocks))
    assert list(pool.free) == [3, 4, 2, 1]
    assert pool.lookup(key, 10) == [1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(1) == [2]  # the request's deepest cached block goes first
    assert pool.lookup(key, 10) == [1]
    pool.touch([1])  # a hit takes it out of the queue
    assert pool.num_free == 0 and pool.ref[1] == 1
    pool.free_blocks([1])
    assert list(pool.free) == [1] and pool.lookup(key, 10) == [1]


def test_a_key_cached_twice_is_found_while_either_block_holds_it():
    pool = BlockPool(3)
    key = lambda i: "k"  # noqa: E731
    x, y = pool.allocate(1), pool.allocate(1)
    pool.cache_full_blocks(x, 0, 1, key)
    pool.cache_full_blocks(y, 0, 1, key)
    assert pool.lookup(key, 1) == x  # the first cached
    pool.free_blocks(x)
    pool.allocate(1)  # never-used block 3 first
    assert pool.allocate(1) == x  # evicts x's entry: y still holds the key
    assert pool.lookup(key, 1) == y


def test_an_unknown_preemption_mode_is_refused():
    with pytest.raises(KvsimError, match="scheduler.preemption"):
        ChunkedConfig(num_blocks=10, preemption="drop")


@pytest.mark.parametrize("swap_tokens,swapped", [(100, True), (7, False)])
def test_swap_preemption_copies_the_victims_kv_out_and_back_instead_of_recomputing(swap_tokens, swapped):
    # the recompute case above with swap: c's 8 computed tokens go to host memory at step 4 (a swap
    # space of 100 tokens holds them; one of 7 does not, and c is recomputed as above)
    s = ChunkedScheduler(ChunkedConfig(num_blocks=6, max_num_batched_tokens=100, block_tokens=4,
                                       preemption="swap", swap_tokens=swap_tokens))
    a, b, c = req("a", 6, 4), req("b", 6, 10), req("c", 6, 10)
    for r in (a, b, c):
        s.add_request(r)
    for _ in range(3):
        step(s)
    plan, finished = step(s)
    assert plan.preempted == [c] and finished == [a] and s.stats.preemptions == 1
    assert plan.swapped_out == ([(c, 8)] if swapped else [])
    plan, _ = step(s)
    if swapped:
        # c comes back with its 8 tokens copied in: only its 3rd output token (no KV yet) is computed
        assert rows(plan) == [("b", 1, True), ("c", 1, True)]
        assert plan.swapped_in == {c: 8} and s.stats.swapped_tokens == s.stats.swapped_in_tokens == 8
        assert s.stats.recomputed_tokens == 0
        assert c.swapped_tokens == 0 and c.num_computed_tokens == 9
    else:
        assert rows(plan) == [("b", 1, True), ("c", 9, False)]
        assert plan.swapped_in == {} and s.stats.swapped_tokens == 0 and s.stats.recomputed_tokens == 8
