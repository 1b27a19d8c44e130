"""The chunked engine's shortcuts give the general code's numbers bit for bit.

The hot path prices a step with `CostModel.iteration_s` (no `IterationCost` built) and a decode
span, under the roofline with measured efficiencies, with `decode_step_s` inline; the scheduler reads
a request's stop (`SeqRequest.stop_output`) fixed when it is added. Each is compared here with the
general form it stands for, on exact equality (no tolerance: the simulator's figures must not move).
"""
import copy
import math
import random

import pytest

from profiles import small_profile
from sim.config import load_config
from sim.costmodel import CostModel, ProfileCost, RooflineCost, build_cost_model, parse_profile
from sim.efficiency import H100 as H100_EFFICIENCY
from sim.models import MODELS
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest

ITERATION = {
    "decode_ms": {"batch": [1, 4], "context_tokens": [100, 500], "ms": [[10.0, 12.0], [14.0, 20.0]]},
    "chunk_ms": {"new_tokens": [16, 1024], "history_tokens": [0, 1024], "ms": [[11.0, 12.0], [30.0, 40.0]]},
    "shared_ms": 8.0,
}


def _roofline(model, gpu, efficiency):
    return build_cost_model(load_config({"model": model, "gpu": {"name": gpu, "efficiency": efficiency}}))


def _profile(iteration):
    raw = small_profile()
    if iteration is not None:
        raw["models"]["llama2-7b"]["iteration"] = copy.deepcopy(iteration)
    return ProfileCost(MODELS["llama2-7b"], parse_profile(raw, "p.yaml"))


COSTS = {
    "roofline measured 13b a100": lambda: _roofline("llama2-13b", "a100-80gb", "measured"),
    "roofline measured 7b h100": lambda: _roofline("llama2-7b", "h100-80gb", "measured"),
    "roofline constant 13b a100": lambda: _roofline("llama2-13b", "a100-80gb", "constant"),
    # the executor's GQA decode graphs: a decode step not linear in the context (the inline span must not apply)
    "roofline masked gqa": lambda: RooflineCost(MODELS["llama3.1-8b"], 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3,
                                                efficiency=H100_EFFICIENCY, attention="masked", sms=132),
    "profile with iteration": lambda: _profile(ITERATION),
    "profile without iteration": lambda: _profile(None),
}


@pytest.mark.parametrize("name", list(COSTS))
def test_iteration_s_is_the_iteration_total_bit_for_bit(name):
    cost = COSTS[name]()
    rng = random.Random(7)
    for _ in range(300):
        chunks = [(rng.randint(1, 2048), rng.randint(0, 4000)) for _ in range(rng.randint(0, 3))]
        batch = rng.randint(0 if chunks else 1, 12)
        ctx = batch * rng.randint(1, 3000)
        load = rng.choice([0.0, 0.0, rng.uniform(1e-6, 5e-3)])
        buffers, layerwise = rng.choice([1, 2, 4]), rng.random() < 0.8
        want = cost.iteration(chunks, batch, ctx, load, buffers, layerwise).total_s
        assert cost.iteration_s(chunks, batch, ctx, load, buffers, layerwise) == want


@pytest.mark.parametrize("name", ["roofline measured 13b a100", "roofline measured 7b h100", "roofline masked gqa"])
def test_the_roofline_decode_span_inline_is_the_general_span_bit_for_bit(name):
    cost = COSTS[name]()
    rng = random.Random(11)
    cut = 0
    for _ in range(2000):
        B = rng.randint(1, 16)
        S = B * rng.randint(1, 4000)
        kmax = rng.randint(1, 3000)
        budget = rng.choice([math.inf, rng.uniform(0.0, 2.0), rng.uniform(0.0, 0.05), -1.0])
        cost.decode_span(B, S, kmax, budget)  # the batch's fixed terms are cached by the first call
        got = cost.decode_span(B, S, kmax, budget)
        assert got == CostModel.decode_span(cost, B, S, kmax, budget)
        cut += got[1] < kmax
    assert cut > 500  # the cut branch is exercised, not only whole spans


@pytest.mark.parametrize("name", ["roofline measured 13b a100", "roofline measured 7b h100"])
def test_the_decode_span_computing_both_attention_sides_is_the_general_span_bit_for_bit(name):
    """These models' attention term has a side that wins at every context, so the inline span computes
    only that one; where the slopes are too close to decide, it computes both, with the same result."""
    cost = COSTS[name]()
    assert cost._span_side is not None
    cost._span_side = None
    rng = random.Random(12)
    for _ in range(500):
        B = rng.randint(1, 16)
        S = B * rng.randint(1, 4000)
        kmax = rng.randint(1, 3000)
        budget = rng.choice([math.inf, rng.uniform(0.0, 2.0), rng.uniform(0.0, 0.05)])
        cost.decode_span(B, S, kmax, budget)
        assert cost.decode_span(B, S, kmax, budget) == CostModel.decode_span(cost, B, S, kmax, budget)
    assert not cost._span_terms  # never the one-side form


def test_a_scheduler_that_is_not_blocked_plans_no_decode_stretch():
    """The engine reads `ChunkedScheduler.blocked` to skip `decode_run_limit`: while it is False (an
    arrival at an empty queue, a finish that may let the queue's head in), the limit is 0."""
    s = ChunkedScheduler(ChunkedConfig(100, block_tokens=4))
    s.add_request(SeqRequest("a", 8, 50, segments=[(0, "a", 0)]))
    assert not s.blocked and s.decode_run_limit(10) == 0
    s.update(s.schedule())  # admits "a", whose prompt samples its first token
    assert s.blocked and s.decode_run_limit(10) == 10
    s.add_request(SeqRequest("b", 8, 50, segments=[(0, "b", 0)]))
    assert not s.blocked and s.decode_run_limit(10) == 0


def _added(prompt, max_tokens, max_model_len):
    s = ChunkedScheduler(ChunkedConfig(100, max_model_len=max_model_len))
    r = SeqRequest("a", prompt, max_tokens, block_key=lambda i: ("a", i))
    s.add_request(r)
    return r.stop_output


def test_a_request_stops_at_its_max_tokens_or_where_it_reaches_the_model_length():
    assert _added(90, 20, None) == 20  # no model length: max_tokens
    assert _added(90, 20, 100) == 10  # 90 + 10 reaches 100 first
    assert _added(70, 20, 100) == 20  # 70 + 20 = 90 < 100: max_tokens first
    assert _added(80, 20, 100) == 20  # both at once
    assert _added(100, 5, 100) == 0  # a prompt at the length: its first sampled token ends it


@pytest.mark.parametrize("name", ["roofline measured 13b a100", "roofline measured 7b h100", "roofline masked gqa"])
def test_a_decode_step_costs_the_same_once_its_batch_terms_are_cached(name):
    """The first step of a batch goes through `decode_parts` (filling the batch's fixed terms); later
    ones take the inline form where the step is linear in the context (and `decode_span` with them):
    both must give the same seconds, or the masked GQA kernel's walk would be lost after the first."""
    rng = random.Random(3)
    for _ in range(200):
        cost = COSTS[name]()
        B = rng.randint(1, 64)
        first = cost.decode_step_s(B, B * rng.randint(1, 8192))
        S = B * rng.randint(1, 8192)
        fresh = COSTS[name]()
        assert cost.decode_step_s(B, S) == fresh.decode_step_s(B, S)
        assert first > 0.0


# ---- the chunked scheduler's kept decode state and its all-decode step ----------------------------

def _kept_is_scanned(s) -> bool:
    """The kept state is what a scan of the running requests finds; its 'keyed up to date' may only
    err on the safe side (False after all of them finished, or before `settle`)."""
    dec = s._decoding
    if dec is None:
        return False
    scan = s._scan_decodes()
    if not dec or not scan:
        assert dec == scan
    else:
        assert dec[:2] == scan[:2] and (scan[2] or not dec[2]), (dec, scan)
    return True


def _general(s):
    """Forget the state `ChunkedScheduler` keeps of its running batch as pure decodes: the next call
    scans the requests again, and `schedule` takes its request-by-request loop."""
    s._decoding = None


@pytest.mark.parametrize("pool", ["runs", "exact"])
@pytest.mark.parametrize("seed", range(24))
def test_the_kept_decode_state_and_the_all_decode_step_are_the_general_codes(seed, pool):
    """`update` and `apply_decodes` keep (context, steps to the first stop, keys lazily up to date) of an
    all-decode batch, which `decode_run_limit` reads instead of scanning and `schedule` uses to plan
    the running requests' decodes at once: a scheduler that forgets it before every call must plan the
    same steps and reach the same state, and the kept state must be what a scan finds."""
    checked, _ = _drive_kept(seed, pool)
    assert checked > 500


def test_the_kept_decode_state_streams_take_the_all_decode_step():
    """The comparison above is only as good as its streams: over the seeds, steps plan a whole batch of
    decodes at once many times (tight pools block the queue instead)."""
    assert sum(_drive_kept(seed, "runs")[1] for seed in range(24)) > 800


def _drive_kept(seed, pool):
    from test_block_pools import Stream, _plan, _state

    rng = random.Random(seed)
    bt = rng.choice([1, 4, 16])
    # pools from too small (preemptions, a blocked queue) to roomy (batches that decode together)
    cfg = ChunkedConfig(num_blocks=rng.choice([40, 150, 600, 2000]), max_num_batched_tokens=rng.choice([16, 64, 512]),
                        max_num_seqs=rng.choice([2, 6, 64]), block_tokens=bt, max_model_len=rng.choice([None, 700]),
                        long_prefill_token_threshold=rng.choice([0, 0, 48]), pool=pool,
                        lazy_tail_keys=rng.random() < 0.7, prefix_caching=rng.random() < 0.9,
                        hold_finished=seed % 3 == 0)  # freed by the caller (below), as the engine's saves do
    kept, general = ChunkedScheduler(cfg), ChunkedScheduler(cfg)
    stream = Stream(rng, bt)
    rid = t = at_once = 0
    checked = 0
    while t < 1500:
        if rng.random() < 0.08:
            rid += 1
            spec = stream.session_turn(rid, rng.randrange(5)) if rng.random() < 0.6 else stream.hashed_turn(rid)
            for s in (kept, general):
                s.add_request(SeqRequest(spec[0], spec[1], spec[2], segments=list(spec[3])))
        checked += _kept_is_scanned(kept)
        kmax = rng.randrange(1, 40)
        _general(general)
        k = kept.decode_run_limit(kmax)
        assert general.decode_run_limit(kmax) == k, t
        checked += _kept_is_scanned(kept)
        assert (kept.decode_context_tokens, kept.decode_block_limited) == \
            (general.decode_context_tokens, general.decode_block_limited) or not k
        if k and rng.random() < 0.5:
            finished = [s.apply_decodes(k) for s in (kept, general)]
            t += k
        else:
            dec = kept._decoding
            at_once += bool(dec and (dec[2] or not cfg.prefix_caching) and kept.running)
            _general(general)
            plans = [s.schedule() for s in (kept, general)]
            assert _plan(plans[0]) == _plan(plans[1]), t
            assert [(p.num_decodes, p.decode_context_tokens, p.chunks, p.num_scheduled_tokens) for p in plans][0] == \
                [(p.num_decodes, p.decode_context_tokens, p.chunks, p.num_scheduled_tokens) for p in plans][1], t
            finished = [s.update(p) for s, p in zip((kept, general), plans)]
            t += 1
        done = [[r.id for r in rs] for rs in finished]
        assert done[0] == done[1], t
        if cfg.hold_finished:  # their saves read them at once
            for s, rs in zip((kept, general), finished):
                for r in rs:
                    s.free_finished(r)
        if rng.random() < 0.1:  # `_state` settles lazy keys: not on every step, or nothing stays lazy
            assert _state(kept) == _state(general), t
    return checked, at_once


# ---- the chunked engine's turn: one object as the scheduler's request and the store's job -------------

def test_a_turn_request_starts_as_the_seq_request_it_stands_for():
    """`TurnRequest.__init__` sets `SeqRequest.__init__`'s fields itself (one call a turn fewer): every slot
    of a fresh `SeqRequest` must hold the same value, and `Job`'s fields the same as a `Job` built alike."""
    from sim.engine import TurnRequest
    from sim.scheduler import Job

    turn = TurnRequest(7, "s3", 2.5, ("s3",), 300, 40, 25, True, False, 5)
    turn.segments = [(0, ("s3", 1), 0)]
    seq = SeqRequest(7, 340, 25, segments=[(0, ("s3", 1), 0)])
    for slot in SeqRequest.__slots__:
        if slot == "stop_output":  # set by `add_request`
            assert not hasattr(turn, slot) and not hasattr(seq, slot)
            continue
        assert getattr(turn, slot) == getattr(seq, slot), slot
    job = Job(7, "s3", 2.5, ("s3",), 300, 40, 25, True, False, 5)
    for slot in TurnRequest.__slots__:
        if slot in ("admitted_s", "sampled"):  # the engine's own: not admitted, no token sampled
            assert (turn.admitted_s, turn.sampled) == (-1.0, False)
            continue
        assert getattr(turn, slot) == getattr(job, slot), slot
    with pytest.raises(ValueError):
        TurnRequest(8, "s4", 0.0, (), 0, 0, 5, False)


def test_a_turn_stops_at_its_reply_length_as_add_request_would_stop_it():
    """`ChunkedReplica.submit` sets `stop_output` to the reply length instead of `add_request`'s rule (the
    reply, cut where prompt + reply reaches the window): `make_job` keeps every turn inside the window, so
    the two agree, for long histories, long prompts and long replies alike."""
    import numpy as np
    import pandas as pd
    import simpy

    from sim.engine import ChunkedReplica, TurnRequest
    from sim.workload import load_workload

    cfg = load_config({}, {"model": "llama2-7b", "scheduler.kind": "chunked"})
    window = build_cost_model(cfg).shape.max_context_tokens
    df = pd.DataFrame([dict(session_id=f"s{k}", turn=0, arrival_s=1.0, think_s=np.nan, prompt_tokens=p,
                            output_tokens=o)
                       for k, (p, o) in enumerate([(100, 50), (window - 10, 50), (50, window + 5),
                                                   (window, window), (3000, 1000)])])
    wl = load_workload(cfg, df)
    replica = ChunkedReplica(simpy.Environment(), cfg, build_cost_model(cfg), wl)
    m = replica.sched._max_len
    assert m == window
    checked = 0
    for hist in (0, 1000, window - 1, 2 * window):
        for i in range(len(wl)):
            replica.turns.session_context[wl.session[i]] = hist
            req = replica.turns.make_job(i, 1.0, TurnRequest)
            rule = req.max_tokens if req.max_tokens < m - req.prompt_tokens else m - req.prompt_tokens
            assert req.output == rule, (hist, i)
            checked += 1
    assert checked == 20


# ---- the commonest step planned and applied at once (`ChunkedScheduler.admit_step`) -------------------

@pytest.mark.parametrize("pool", ["runs", "exact"])
@pytest.mark.parametrize("seed", range(24))
def test_the_admission_step_at_once_is_schedule_then_update(seed, pool):
    """`admit_step` stands for `schedule` then `update` when the queue's one fresh request meets a batch
    of decodes: on random streams (hits, an external store behind HBM, tight pools, thresholds), a
    scheduler that takes it wherever it applies must plan the same steps (the figures a caller prices),
    finish and sample the same requests and reach the same state as one that never takes it."""
    taken, _ = _drive_admit(seed, pool)
    assert taken  # how often over all seeds: below


def test_the_admission_step_streams_take_both_of_its_outcomes():
    """The comparison above is only as good as its streams: over the seeds, the step at once admits the
    request many times and finds it too large for the free blocks some times."""
    outcomes = [_drive_admit(seed, "runs")[1] for seed in range(24)]
    assert sum(o["admitted"] for o in outcomes) > 600
    assert sum(o["blocked"] for o in outcomes) > 80
    assert sum(o["finished"] for o in outcomes) > 20  # a one-token reply ends at its first token


def _drive_admit(seed, pool):
    from test_block_pools import Stream, _plan, _state

    rng = random.Random(1000 + seed)
    bt = rng.choice([1, 4, 16])
    # room for a few requests (a queue that waits for blocks) to many
    cfg = ChunkedConfig(num_blocks=rng.choice([600, 1500, 3000, 10000]) // bt, max_num_batched_tokens=rng.choice([64, 512, 2048]),
                        max_num_seqs=rng.choice([2, 6, 64]), block_tokens=bt, max_model_len=rng.choice([None, 700]),
                        long_prefill_token_threshold=rng.choice([0, 0, 48]), pool=pool,
                        watermark=rng.choice([0.0, 0.0, 0.05]),
                        lazy_tail_keys=rng.random() < 0.7, prefix_caching=rng.random() < 0.9,
                        hold_finished=seed % 3 == 0)
    # an external store behind HBM (the engine's host store): none, half or all of a request's tokens
    ext_calls = ([], [])

    def external(side):
        def hit(req, h):
            ext_calls[side].append((req.id, h))
            return (0, 0, req.prompt_tokens // 2, req.prompt_tokens)[req.id % 4]
        return hit if seed % 2 else None

    fast, general = ChunkedScheduler(cfg, external(0)), ChunkedScheduler(cfg, external(1))
    stream = Stream(rng, bt)
    rid = t = taken = 0
    outcomes = {"admitted": 0, "blocked": 0, "finished": 0}
    # arrivals per step: from a light load (the engine's: the step at once applies) to a queue that grows
    rate = rng.choice([0.02, 0.05, 0.1, 0.2])
    while t < 3000:
        if rng.random() < rate:
            rid += 1
            spec = stream.session_turn(rid, rng.randrange(5)) if rng.random() < 0.6 else stream.hashed_turn(rid)
            if rng.random() < 0.05:
                spec = (spec[0], spec[1], 1, spec[3])  # a one-token reply
            if cfg.max_model_len and spec[1] >= cfg.max_model_len:
                continue  # a prompt the model cannot take (vLLM refuses it before scheduling)
            for s in (fast, general):
                s.add_request(SeqRequest(spec[0], spec[1], spec[2], segments=list(spec[3])))
        kmax = rng.randrange(1, 40)
        k = fast.decode_run_limit(kmax)
        assert general.decode_run_limit(kmax) == k, t
        if k and rng.random() < 0.5:
            finished = [s.apply_decodes(k) for s in (fast, general)]
            t += k
        else:
            step = fast.admit_step()
            plan = general.schedule()
            if step is None:
                p = fast.schedule()
                assert _plan(p) == _plan(plan), t
                finished = [fast.update(p)]
            else:
                taken += 1
                r, hit, ext, n, computed, B, ctx, done = step
                assert (B, ctx) == (plan.num_decodes, plan.decode_context_tokens), t
                if r is None:
                    outcomes["blocked"] += 1
                    assert not plan.admitted and not plan.chunks, t
                else:
                    outcomes["admitted"] += 1
                    outcomes["finished"] += bool(done)
                    assert {r.id: hit} == {q.id: h for q, h in plan.admitted.items()}, t
                    assert ({r.id: ext} if ext else {}) == {q.id: e for q, e in plan.external.items()}, t
                    assert [(n, computed)] == plan.chunks, t
                finished = [done]
            finished.append(general.update(plan))
            assert [q.id for q in fast.first_sampled] == [q.id for q in general.first_sampled], t
            t += 1
        assert [[q.id for q in rs] for rs in finished] == [[q.id for q in finished[1]]] * 2, t
        assert (fast._decoding, fast.blocked, fast._lazy) == (general._decoding, general.blocked, general._lazy), t
        assert ext_calls[0] == ext_calls[1], t
        if cfg.hold_finished:
            for s, rs in zip((fast, general), finished):
                for q in rs:
                    s.free_finished(q)
        if rng.random() < 0.1:
            assert _state(fast) == _state(general), t
    assert _state(fast) == _state(general)
    return taken, outcomes
