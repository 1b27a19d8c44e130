"""Serving with the chunked scheduler (scheduler.kind chunked, sim/engine.py ChunkedReplica): hand-computed
TTFTs, preemption, invariants on random workloads, and the pure-decode fast path against stepping."""
import random

import numpy as np
import pandas as pd
import pytest

from sim.config import load_config
from sim.costmodel import build_cost_model
from sim.errors import KvsimError
from sim.runner import run_simulation
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest
from sim.workload import load_workload
from workloads import random_sessions

POLICIES = ["recompute", "hbm_prefix", "attentionstore"]


def _run(df, **over):
    cfg = load_config({}, {"model": "llama2-7b", "scheduler.kind": "chunked", **over})
    return run_simulation(cfg, load_workload(cfg, df)), cfg


def _two_turns(p0=300, o0=20, p1=100, o1=10, think=50.0):
    return pd.DataFrame([
        dict(session_id="a", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=p0, output_tokens=o0),
        dict(session_id="a", turn=1, arrival_s=np.nan, think_s=think, prompt_tokens=p1, output_tokens=o1),
    ])


@pytest.mark.parametrize("policy", POLICIES)
def test_two_turns_ttft_is_one_iteration_over_what_the_prefix_cache_and_the_store_leave(policy):
    res, cfg = _run(_two_turns(), **{"policy.kind": policy})
    cm = build_cost_model(cfg)
    t = res.turns.set_index("turn")
    assert t.loc[0, "ttft_s"] == pytest.approx(cm.iteration([(300, 0)], 0, 0.0).total_s)
    # turn 0 computed 319 of its 320 tokens (the last sampled token is never fed back): 19 whole
    # blocks of 16 = 304 tokens stay cached in HBM; turn 1's input is 320 + 100 = 420 tokens
    if policy == "recompute":
        want, hit, tier = cm.iteration([(420, 0)], 0, 0.0).total_s, 0, "miss"
    elif policy == "hbm_prefix":
        want, hit, tier = cm.iteration([(116, 304)], 0, 0.0).total_s, 304, "hbm"
    else:
        # the host store holds all 320 history tokens: it adds the 20th block (16 tokens) from DRAM,
        # loaded layer by layer during the step
        layer_bytes = 16 * cm.shape.kv_bytes_per_token_layer
        load = cm.history_load_layer_s(layer_bytes)
        want, hit, tier = cm.iteration([(100, 320)], 0, 0.0, load, 2, True).total_s, 320, "dram"
    assert t.loc[1, "ttft_s"] == pytest.approx(want)
    assert t.loc[1, "hit_tokens"] == hit
    assert t.loc[1, "hit_tier"] == tier
    assert t.loc[1, "history_tokens"] == 320


def test_a_long_prompt_is_chunked_over_three_iterations():
    df = _two_turns(p0=2500, o0=5).iloc[:1]
    res, cfg = _run(df, **{"scheduler.max_num_batched_tokens": 1000, "policy.kind": "recompute"})
    cm = build_cost_model(cfg)
    want = sum(cm.iteration([(n, h)], 0, 0.0).total_s for n, h in ((1000, 0), (1000, 1000), (500, 2000)))
    assert res.turns.ttft_s[0] == pytest.approx(want)
    assert res.turns.prefill_s[0] == pytest.approx(want)


def test_shared_system_prompt_blocks_are_hit_by_every_later_session():
    df = pd.DataFrame([dict(session_id=s, turn=0, arrival_s=10.0 * k, think_s=np.nan, prompt_tokens=300,
                            output_tokens=5) for k, s in enumerate("abc")])
    res, cfg = _run(df, **{"policy.kind": "hbm_prefix", "workload.shared_prefix_tokens": 120})
    # 120 tokens: 7 whole blocks of 16 = 112 tokens shared
    assert res.turns.hit_tokens.tolist() == [0, 112, 112]
    cm = build_cost_model(cfg)
    assert res.turns.ttft_s[1] == pytest.approx(cm.iteration([(188, 112)], 0, 0.0).total_s)


def _tiny_hbm(blocks):
    """Overrides giving llama2-7b on an A100 about `blocks` KV blocks of 16 tokens."""
    cfg = load_config({}, {"model": "llama2-7b"})
    cm = build_cost_model(cfg)
    weights = cfg.gpu.spec().hbm_bytes * (1 - cfg.gpu.reserved_fraction) - cm.hbm_kv_bytes
    return {"gpu.hbm_bytes": weights + blocks * 16 * cm.shape.kv_bytes_per_token + 1.0, "gpu.reserved_fraction": 0.0}


def test_preemption_under_a_tiny_hbm_recomputes_and_still_serves_every_turn():
    df = random_sessions(20, seed=1, rate_per_s=5.0, prompt_mean=150, output_mean=150, think_mean_s=1.0,
                         mean_turns=2)
    res, cfg = _run(df, **{"policy.kind": "hbm_prefix", **_tiny_hbm(120)})
    t = res.turns
    assert t.finish_s.notna().all() and (t.ttft_s > 0).all()
    # the replica counts preemptions and what they cost
    import simpy
    from sim.engine import ChunkedReplica
    from sim.workload import Users
    env = simpy.Environment()
    rep = ChunkedReplica(env, cfg, build_cost_model(cfg), load_workload(cfg, df))
    assert rep.sched.cfg.num_blocks == 120
    users = Users(env, load_workload(cfg, df), rep)
    rep.attach(users)
    env.run(until=users.all_done)
    assert rep.preemption_stats.preemptions > 0 and rep.preemption_stats.recomputed_tokens > 0
    assert sum(rep.rec.preemptions) == rep.preemption_stats.preemptions


@pytest.fixture(scope="module")
def busy_sessions():
    return random_sessions(60, seed=3, rate_per_s=0.5, prompt_mean=300, output_mean=120, think_mean_s=20)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_turn_is_served_exactly_once_after_it_arrives(busy_sessions, policy):
    res, _ = _run(busy_sessions, **{"policy.kind": policy})
    t = res.turns
    assert len(t) == len(busy_sessions)
    assert t.finish_s.notna().all() and (t.ttft_s > 0).all()
    assert (t.finish_s >= t.arrival_s + t.ttft_s - 1e-9).all()
    assert (t.hit_tokens + t.computed_tokens == t.history_tokens + t.prompt_tokens).all()
    if policy == "recompute":
        assert (t.hit_tokens == 0).all()


def test_same_config_and_seed_give_identical_results(busy_sessions):
    a, _ = _run(busy_sessions, **{"policy.kind": "attentionstore", "scheduler.max_num_batched_tokens": 512})
    b, _ = _run(busy_sessions, **{"policy.kind": "attentionstore", "scheduler.max_num_batched_tokens": 512})
    pd.testing.assert_frame_equal(a.turns, b.turns)


# ---- the pure-decode fast path gives the scheduler's own step-by-step state ---------------------

def _state(s):
    s.settle()
    pool = s.pool
    exact = pool.block_table if hasattr(pool, "block_table") else (lambda r: None)  # ids: the exact pool only
    return ([(r.id, r.num_computed_tokens, r.num_output_tokens, r.num_blocks, r.num_cached_blocks,
              pool.request_keys(r), pool.request_refs(r), exact(r)) for r in s.running],
            [r.id for r in s.waiting], pool.num_free, pool.queue_keys(), s.stats.preemptions,
            s.stats.recomputed_tokens)


@pytest.mark.parametrize("pool", ["runs", "exact"])
@pytest.mark.parametrize("seed", range(6))
def test_decode_fast_path_matches_stepping_one_by_one(seed, pool):
    rng = random.Random(seed)
    cfg = ChunkedConfig(num_blocks=rng.choice([60, 120, 400]), max_num_batched_tokens=rng.choice([64, 256, 2048]),
                        max_num_seqs=rng.choice([3, 8, 64]), max_model_len=rng.choice([None, 900]), pool=pool)
    arrivals = {}
    for k in range(40):
        sess = rng.randrange(6)
        arrivals.setdefault(rng.randrange(3000), []).append(
            (k, rng.randrange(1, 600), rng.randrange(1, 300), sess))

    def make(k, p, o, sess):
        return SeqRequest(k, p, o, lambda i, s=sess, k=k: ("sys", i) if i < 3 else (s, k, i))

    slow, fast = ChunkedScheduler(cfg), ChunkedScheduler(cfg)
    done_slow, done_fast = [], []
    t_slow = t_fast = 0
    horizon = 6000
    fast_steps = 0
    while t_slow < horizon:
        for a in arrivals.get(t_slow, ()):
            slow.add_request(make(*a))
        done_slow += [r.id for r in slow.update(slow.schedule())]
        t_slow += 1
        # the fast one catches up: whole stretches where it can, cut at the next arrival
        while t_fast < t_slow:
            for a in arrivals.get(t_fast, ()):
                fast.add_request(make(*a))
            nxt = min((s for s in arrivals if s > t_fast), default=horizon + 1) - t_fast
            k = fast.decode_run_limit(min(nxt, t_slow + 50 - t_fast))
            if k:
                done_fast += [r.id for r in fast.apply_decodes(k)]
                fast_steps += k
                t_fast += k
            else:
                done_fast += [r.id for r in fast.update(fast.schedule())]
                t_fast += 1
        while t_slow < t_fast:
            for a in arrivals.get(t_slow, ()):
                slow.add_request(make(*a))
            done_slow += [r.id for r in slow.update(slow.schedule())]
            t_slow += 1
        assert _state(fast) == _state(slow), t_slow
        assert done_fast == done_slow
    assert len(done_slow) == 40 and fast_steps > 1000


@pytest.mark.parametrize("fetch,tier", [(True, "dram"), (False, "ssd")])
def test_a_request_waiting_in_the_look_ahead_window_has_its_ssd_history_staged_into_dram(fetch, tier):
    # DRAM holds one 320-token history (llama2-7b: 0.5 MiB a token): a's save pushes b's to SSD. Both
    # second turns arrive together and one runs at a time, so b waits behind a's 3,000-token prompt:
    # scheduler-aware fetching reads b's history into DRAM meanwhile, and b then loads it from DRAM
    df = pd.DataFrame([
        dict(session_id="b", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=300, output_tokens=20),
        dict(session_id="a", turn=0, arrival_s=3.0, think_s=np.nan, prompt_tokens=300, output_tokens=20),
        dict(session_id="a", turn=1, arrival_s=np.nan, think_s=10.0, prompt_tokens=3000, output_tokens=50),
        dict(session_id="b", turn=1, arrival_s=np.nan, think_s=12.0, prompt_tokens=100, output_tokens=10),
    ])
    res, _ = _run(df, **{"policy.kind": "attentionstore", "scheduler.max_num_seqs": 1,
                         "host.dram_bytes": 400 * 524288, "policy.scheduler_aware_fetch": fetch})
    t = res.turns.set_index(["session_id", "turn"])
    assert t.loc[("a", 1), "hit_tier"] == "dram"
    assert t.loc[("b", 1), "queue_s"] > 0.1  # it waited
    assert t.loc[("b", 1), "hit_tier"] == tier and t.loc[("b", 1), "hit_tokens"] == 320


def test_swap_preemption_pays_its_copies_out_and_back_and_recomputes_nothing():
    # llama2-7b in 16 GB (10% reserved): ~0.9 GB of KV (~110 blocks of 16 tokens) for 8 sessions arriving at once with
    # 300-token prompts and 400-token replies: blocks run out and the newest running request is preempted
    df = pd.DataFrame([dict(session_id=f"s{k}", turn=0, arrival_s=1.0 + 0.01 * k, think_s=np.nan,
                            prompt_tokens=300, output_tokens=400) for k in range(8)])
    over = {"policy.kind": "hbm_prefix", "gpu.hbm_bytes": 16e9, "host.h2d_gbps": 20.0, "host.d2h_gbps": 10.0}
    rec, _ = _run(df, **over)
    swap, cfg = _run(df, **over, **{"scheduler.preemption": "swap"})
    r, s = rec.summary, swap.summary
    assert r["preemptions"] > 0 and r["preempted_tokens_recomputed"] > 0 and r["preempted_tokens_swapped"] == 0
    assert s["preemptions"] > 0 and s["preempted_tokens_recomputed"] == 0 and s["preempted_tokens_swapped"] > 0
    # the host links move nothing else here, so each step waits exactly for its own copies
    kv = build_cost_model(cfg).shape.kv_bytes_per_token
    # back: what the prefix cache no longer held of the request's blocks
    assert 0 < s["preempted_tokens_swapped_in"] <= s["preempted_tokens_swapped"]
    want = kv * (s["preempted_tokens_swapped"] / 10e9 + s["preempted_tokens_swapped_in"] / 20e9)
    assert s["swap_wait_s"] == pytest.approx(want, rel=1e-9)
    assert (swap.turns.ttft_s > 0).all() and swap.turns.finish_s.notna().all()


def test_swap_preemption_falls_back_to_recompute_when_the_swap_space_is_full():
    df = pd.DataFrame([dict(session_id=f"s{k}", turn=0, arrival_s=1.0 + 0.01 * k, think_s=np.nan,
                            prompt_tokens=300, output_tokens=400) for k in range(8)])
    res, _ = _run(df, **{"policy.kind": "hbm_prefix", "gpu.hbm_bytes": 16e9, "scheduler.preemption": "swap",
                         "scheduler.swap_space": 0})
    assert res.summary["preemptions"] > 0 and res.summary["preempted_tokens_swapped"] == 0
    assert res.summary["preempted_tokens_recomputed"] > 0


def test_round_attention_loads_only_the_kept_rounds_above_the_watershed():
    # 32 layers, watershed 8, kept 0.5: (8 + 24 * 0.5) / 32 = 0.625 of the history's bytes are loaded
    over = {"policy.kind": "attentionstore", "policy.round_attention.watershed_layer": 8,
            "policy.round_attention.kept_fraction": 0.5}
    full, _ = _run(_two_turns(), **over)
    ra, _ = _run(_two_turns(), **over, **{"policy.round_attention.enabled": True})
    assert full.turns.bytes_loaded[1] > 0
    assert ra.turns.bytes_loaded[1] == pytest.approx(0.625 * full.turns.bytes_loaded[1])
    assert ra.turns.ttft_s[1] < full.turns.ttft_s[1]


def test_peak_kv_in_hbm_counts_the_block_pool_cached_blocks_included():
    # turn 0 of _two_turns computes 319 tokens: 20 blocks of 16, 19 of them full and cached after it ends
    # (the partial one is freed keyless). Turn 1 computes 429 tokens: 27 blocks, its 19 hit blocks plus 8
    # new ones; nothing else is cached then, so HBM held 27 blocks at most
    res, cfg = _run(_two_turns(), **{"policy.kind": "hbm_prefix"})
    kv_tok = build_cost_model(cfg).shape.kv_bytes_per_token
    assert res.summary["peak_hbm_bytes"] == (19 + 8) * 16 * kv_tok


@pytest.mark.parametrize("seed", range(4))
def test_lazy_tail_keys_make_the_same_decisions_as_keying_every_step(seed):
    # the engine's promise: a session's next turn arrives only after its reply ended, so nobody looks up
    # a running request's own chain; its blocks there may take their keys at release instead of per step.
    # A system prompt longer than some prompts puts decode-filled blocks in the shared chain: still eager.
    rng = random.Random(seed)
    cfg = dict(num_blocks=rng.choice([80, 200, 600]), max_num_batched_tokens=rng.choice([64, 512]),
               max_num_seqs=rng.choice([4, 16]), block_tokens=16)
    eager = ChunkedScheduler(ChunkedConfig(**cfg))
    lazy = ChunkedScheduler(ChunkedConfig(**cfg, lazy_tail_keys=True))
    nsys = 3
    ctx = {}  # session -> context tokens after its last turn
    busy = set()  # sessions with a turn in flight
    owner = {}
    k = step = 0
    hits = 0
    while (k < 60 or eager.has_unfinished()) and step < 20000:
        step += 1
        if rng.random() < 0.05 and k < 60:
            free_sessions = [s for s in range(8) if s not in busy]
            if free_sessions:
                s = rng.choice(free_sessions)
                c, ep = ctx.get(s, (0, 0))
                if c > 400:  # truncated: a new epoch of the session's chain, from nothing
                    c, ep = 0, ep + 1
                prompt = c + rng.randrange(1, 120)
                out = rng.randrange(1, 200)
                segs = [(0, "system", 0), (nsys, (s, ep), nsys)]
                for sch in (eager, lazy):
                    sch.add_request(SeqRequest(k, prompt, out, segments=list(segs)))
                busy.add(s)
                owner[k] = (s, prompt + out, ep)
                k += 1
        pe, pl = eager.schedule(), lazy.schedule()
        assert _plan_ids(pe) == _plan_ids(pl), step
        hits += sum(pe.admitted.values())
        de, dl = eager.update(pe), lazy.update(pl)
        assert [r.id for r in de] == [r.id for r in dl]
        for r in de:
            s, total, ep = owner[r.id]
            busy.discard(s)
            ctx[s] = (total, ep)
        assert _state(eager) == _state(lazy), step
    assert k == 60 and not eager.has_unfinished() and hits > 0
    assert eager.stats.preemptions == lazy.stats.preemptions


def _plan_ids(p):
    return ([(x.req.id, x.num_new_tokens, x.is_decode) for x in p.scheduled], [r.id for r in p.preempted],
            {r.id: h for r, h in p.admitted.items()}, p.free_blocks)


@pytest.mark.parametrize("lazy", [False, True])
def test_reply_blocks_inside_the_shared_system_chain_are_cached_as_they_fill(lazy):
    # a 10-token prompt under a 3-block (48-token) system prompt: its reply fills system blocks 0-2 by
    # decoding; 70 tokens in, another session's request hits all three (48 tokens), lazy tail keys or not
    s = ChunkedScheduler(ChunkedConfig(num_blocks=100, block_tokens=16, lazy_tail_keys=lazy))
    s.add_request(SeqRequest("a", 10, 100, segments=[(0, "system", 0), (3, ("a", 0), 3)]))
    for _ in range(60):  # the prefill step, then 59 decodes (the first token came with the prefill)
        k = s.decode_run_limit(1)
        if k:
            s.apply_decodes(k)
        else:
            s.update(s.schedule())
    assert s.running[0].num_computed_tokens == 69
    s.add_request(SeqRequest("b", 100, 5, segments=[(0, "system", 0), (3, ("b", 0), 3)]))
    plan = s.schedule()
    assert {r.id: h for r, h in plan.admitted.items()} == {"b": 48}


@pytest.mark.parametrize("policy", ["hbm_prefix", "attentionstore"])
def test_a_finished_turns_blocks_stay_held_until_its_asynchronous_save_has_read_them(policy):
    # 40 blocks of 16 tokens: a (500-token prompt, 32 blocks) and b (300 tokens, 19 blocks) cannot run
    # together, so b waits for a's blocks. With the host store, a's 519 computed tokens go out over D2H
    # after its last token and its blocks are freed when that copy ends (vLLM's connector holds them:
    # delay_free_blocks); without it they are free at once
    df = pd.DataFrame([dict(session_id="a", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=500, output_tokens=20),
                       dict(session_id="b", turn=0, arrival_s=1.001, think_s=np.nan, prompt_tokens=300, output_tokens=5)])
    # attentionstore's read buffer for layer-wise preload takes 16 of the blocks (2 layers x 4,096 tokens)
    res, cfg = _run(df, **{"policy.kind": policy, **_tiny_hbm(40 if policy == "hbm_prefix" else 56)})
    t = res.turns.set_index("session_id")
    admit_b = t.loc["b", "arrival_s"] + t.loc["b", "queue_s"]
    if policy == "hbm_prefix":
        assert admit_b == pytest.approx(t.loc["a", "finish_s"])
    else:
        cm = build_cost_model(cfg)
        saved = 520 * cm.shape.kv_bytes_per_token  # the context after the reply, as the store keeps it
        assert t.loc["a", "bytes_saved"] == saved
        read = saved / cm.d2h_bw(saved / cm.shape.layers)
        assert read > 5e-3
        assert admit_b == pytest.approx(t.loc["a", "finish_s"] + read)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_held_requests_save_ends_come_in_the_order_they_finished(monkeypatch, preemption):
    # the engine keeps finished requests whose asynchronous save still reads their blocks in a FIFO, not a
    # heap: their ends are transfer ends on the one D2H link (swap-outs included), which never come before
    # an earlier one's. Check every append on a loaded random workload with preemptions
    import sim.engine

    ends = []

    class Checked(sim.engine.deque):
        def append(self, item):
            assert not ends or item[0] >= ends[-1], "a save ended before one queued earlier"
            ends.append(item[0])
            super().append(item)

    monkeypatch.setattr(sim.engine, "deque", Checked)
    df = random_sessions(60, seed=3, rate_per_s=4.0, prompt_mean=200, output_mean=200, think_mean_s=2.0)
    res, _ = _run(df, **{"policy.kind": "attentionstore", "scheduler.preemption": preemption,
                         "gpu.hbm_bytes": 20e9, "host.d2h_gbps": 2.0})
    assert len(ends) > 50 and res.turns.finish_s.notna().all()
    assert res.summary["preemptions"] > 0


def test_held_blocks_are_freed_only_by_their_owner_once_finished():
    s = ChunkedScheduler(ChunkedConfig(num_blocks=10, block_tokens=16, hold_finished=True))
    a = SeqRequest("a", 100, 1, segments=[(0, "a", 0)])  # 7 blocks; its one token comes with the prefill
    b = SeqRequest("b", 60, 3, segments=[(0, "b", 0)])  # 4 blocks: waits for a's
    s.add_request(a)
    s.add_request(b)
    with pytest.raises(RuntimeError):
        s.free_finished(a)  # still running
    plan = s.schedule()
    assert [x.req.id for x in plan.scheduled] == ["a"]
    assert s.update(plan) == [a]
    assert s.free_blocks == 3  # a finished but holds its 7 blocks
    plan = s.schedule()
    assert plan.scheduled == []
    s.update(plan)
    s.free_finished(a)
    assert s.free_blocks == 10
    plan = s.schedule()
    assert [x.req.id for x in plan.scheduled] == ["b"]


def test_a_decode_stretch_ends_at_the_first_step_after_held_blocks_are_freed():
    # c decodes throughout; b waits for a's blocks, which a's D2H save frees: b joins at the end of the
    # first decode step that ends after the save, long before c finishes
    # 56 KV blocks: c ends at 20, a holds 33, b needs 25 (a 400-token prompt): b fits only once a's are free
    df = pd.DataFrame([dict(session_id="c", turn=0, arrival_s=0.5, think_s=np.nan, prompt_tokens=20, output_tokens=300),
                       dict(session_id="a", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=500, output_tokens=20),
                       dict(session_id="b", turn=0, arrival_s=1.001, think_s=np.nan, prompt_tokens=400, output_tokens=5)])
    res, cfg = _run(df, **{"policy.kind": "attentionstore", **_tiny_hbm(56 + 16)})
    cm = build_cost_model(cfg)
    t = res.turns.set_index("session_id")
    saved = 520 * cm.shape.kv_bytes_per_token
    freed = t.loc["a", "finish_s"] + saved / cm.d2h_bw(saved / cm.shape.layers)
    admit_b = t.loc["b", "arrival_s"] + t.loc["b", "queue_s"]
    step = cm.decode_step_s(1, 400)  # c's step, an upper bound at its context
    assert freed <= admit_b < freed + step
    assert admit_b < t.loc["c", "finish_s"] - 1.0
    assert t.loc["a", "finish_s"] < t.loc["c", "finish_s"] - 1.0


def test_a_block_size_that_does_not_divide_the_traces_hash_blocks_is_refused_only_with_hashes():
    # a Mooncake request's 512-token prefix hashes are split into blocks: 24-token blocks cannot be
    df = _two_turns()
    res, _ = _run(df, **{"scheduler.block_tokens": 24})
    assert len(res.turns) == 2  # no hashes: any block size serves
    hashed = df.iloc[:1].assign(prefix_hashes=[[1, 2]])  # a hashed request is a one-turn session
    with pytest.raises(KvsimError, match="scheduler.block_tokens: expected a divisor of the trace's 512-token"):
        _run(hashed, **{"scheduler.block_tokens": 24})
