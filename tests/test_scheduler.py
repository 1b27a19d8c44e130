"""The FCFS prefill-first scheduler on its own (sim/scheduler.py), against a stub store.

The stub answers `lookup` from a table, `admit` from an HBM budget, and records `prefetch` calls, so
every decision below is the scheduler's. A toy shape keeps the bytes round: 1000 bytes of KV per
token.
"""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sim.config import load_config
from sim.models import ModelShape
from sim.scheduler import Job, PrefillFirstScheduler, reusable_block_keys
from sim.trace import BLOCK_TOKENS

SHAPE = ModelShape("toy", layers=5, hidden=50, heads=5, kv_heads=5, intermediate=100, vocab=100,
                   max_context_tokens=4096)
TOK = 1000.0


class StubStore:
    """lookup: turn index -> (hit, entries); admit: while the job's HBM fits `free`; prefetch: logged."""

    def __init__(self, hits=None, free=math.inf):
        self.hbm = SimpleNamespace(name="hbm")
        self.hits = hits or {}
        self.free = free
        self.admitted, self.prefetched, self.looked_up = [], [], []

    def lookup(self, job):
        self.looked_up.append(job.i)
        return self.hits.get(job.i, (0, []))

    def admit(self, job, now):
        if job.res_bytes > self.free:
            return False
        self.free -= job.res_bytes
        self.admitted.append((job.i, now))
        return True

    def prefetch(self, job, now):
        self.prefetched.append((job.i, now))


def _sched(turns, store=None, window=None, **over):
    """A scheduler over `turns` = [(session, prompt, output[, hashes])]."""
    cfg = load_config({}, {"model": "llama2-7b", **over})
    shape = SHAPE if window is None else dataclasses.replace(SHAPE, max_context_tokens=window)
    wl = SimpleNamespace(session=[t[0] for t in turns],
                         prompt_tokens=np.array([t[1] for t in turns], dtype=np.int64),
                         output_tokens=np.array([t[2] for t in turns], dtype=np.int64),
                         prefix_hashes=[t[3] if len(t) > 3 else None for t in turns])
    store = store or StubStore()
    return PrefillFirstScheduler(cfg, shape, wl, store), store


def _enqueue(s, order, t0=0.0):
    for k, i in enumerate(order):
        s.enqueue(s.make_job(i, t0 + k))


def _ids(batch):
    return [j.i for j in batch]


# ---- admission -----------------------------------------------------------------------------------

def test_jobs_are_admitted_in_arrival_order_not_turn_order():
    """Guards FCFS: the queue, not the turn index, orders the batch."""
    s, store = _sched([("a", 10, 5), ("b", 10, 5), ("c", 10, 5)])
    _enqueue(s, [2, 0, 1])
    assert _ids(s.next_batch(1.0, 0)) == [2, 0, 1]
    assert store.admitted == [(2, 1.0), (0, 1.0), (1, 1.0)]
    assert not s.queue


def test_the_token_budget_stops_admission_at_the_first_job_over_it():
    """Guards skipping ahead: 600 + 500 > 1000 stops at the second job even though the third (100)
    would fit; FCFS keeps it waiting."""
    s, _ = _sched([("a", 600, 5), ("b", 500, 5), ("c", 100, 5)], **{"scheduler.max_prefill_tokens": 1000})
    _enqueue(s, [0, 1, 2])
    assert _ids(s.next_batch(0.0, 0)) == [0]
    assert _ids(s.next_batch(0.0, 0)) == [1, 2]


def test_the_budget_counts_computed_tokens_not_reused_ones():
    """Guards charging reused history to the prefill budget: job 0 has 900 tokens of context of
    which 800 are a hit, so it computes 100 and job 1 (800) still fits 1000."""
    hit = SimpleNamespace(tier="dram", nbytes=800 * TOK)
    s, store = _sched([("a", 100, 5), ("b", 800, 5)], StubStore(hits={0: (800, [hit])}),
                      **{"scheduler.max_prefill_tokens": 1000})
    s.session_context["a"] = 800
    _enqueue(s, [0, 1])
    batch = s.next_batch(0.0, 0)
    assert _ids(batch) == [0, 1]
    assert (batch[0].ctx_in, batch[0].hit, batch[0].computed) == (900, 800, 100)


def test_a_first_job_over_the_token_budget_runs_alone():
    """Guards a job larger than the budget waiting forever."""
    s, _ = _sched([("a", 1500, 5), ("b", 10, 5)], **{"scheduler.max_prefill_tokens": 1000})
    _enqueue(s, [0, 1])
    assert _ids(s.next_batch(0.0, 0)) == [0]
    assert _ids(s.next_batch(0.0, 1)) == [1]


@pytest.mark.parametrize("running, admitted", [(0, 3), (2, 2), (3, 1), (4, 0)])
def test_admission_fills_only_the_room_left_in_the_batch(running, admitted):
    """Guards overfilling the running batch (max_batch 4)."""
    s, store = _sched([("a", 10, 5)] * 3, **{"scheduler.max_batch": 4})
    _enqueue(s, [0, 1, 2])
    assert _ids(s.next_batch(0.0, running)) == [0, 1, 2][:admitted]
    if not admitted:
        assert store.looked_up == []   # a full batch plans nothing


def test_a_job_refused_by_hbm_stops_admission():
    """Guards FCFS under HBM pressure: job 1 (4.01 MB) does not fit the 3 MB left after job 0
    (2.01 MB), and job 2 (0.11 MB, which would fit) waits behind it."""
    s, store = _sched([("a", 2000, 10), ("b", 4000, 10), ("c", 100, 10)], StubStore(free=5e6))
    _enqueue(s, [0, 1, 2])
    assert _ids(s.next_batch(0.0, 0)) == [0]
    assert [j.i for j in s.queue] == [1, 2]
    assert store.free == pytest.approx(5e6 - 2010 * TOK)
    assert s.head_need_bytes() == 4010 * TOK


@pytest.mark.parametrize("tier, ra, want", [
    ("dram", {}, (1000 + 100 + 10) * TOK),                  # the whole context and reply
    ("hbm", {}, (1000 + 100 + 10) * TOK - 1000 * TOK),      # the hit already sits in HBM
    # Round Attention, watershed 1 of 5 layers, half the rounds kept: factor (1 + 4 x 0.5) / 5 = 0.6
    ("dram", {"policy.round_attention.enabled": True, "policy.round_attention.watershed_layer": 1,
              "policy.round_attention.kept_fraction": 0.5}, (1000 + 100 + 10) * TOK - 1000 * TOK * 0.4),
])
def test_a_job_holds_hbm_for_its_context_and_reply_less_what_is_there(tier, ra, want):
    """Guards the HBM reservation: double-counting an HBM hit, or holding the full history under
    Round Attention."""
    store = StubStore()
    e = SimpleNamespace(tier=store.hbm if tier == "hbm" else tier, nbytes=1000 * TOK)
    store.hits = {0: (1000, [e])}
    s, _ = _sched([("a", 100, 10)], store, **ra)
    s.session_context["a"] = 1000
    _enqueue(s, [0])
    (job,) = s.next_batch(0.0, 0)
    assert job.res_bytes == pytest.approx(want, rel=1e-12)


# ---- a turn becomes a job: truncation and reuse keys ----------------------------------------------

@pytest.mark.parametrize("hist, prompt, output, want", [
    # (kept history, prompt, output, truncated, keys) in a 1000-token window
    (500, 300, 100, (500, 300, 100, False, ("a",))),
    (800, 300, 100, (600, 300, 100, True, ("a",))),      # oldest 200 tokens dropped
    (800, 300, 5000, (0, 1, 999, True, ())),            # reply capped at W - 1, one prompt token
    (0, 2000, 100, (0, 900, 100, False, ())),           # no history: nothing to reuse
    (800, 900, 100, (0, 900, 100, True, ())),           # history truncated to nothing: no key
])
def test_make_job_drops_history_oldest_first_to_fit_the_window(hist, prompt, output, want):
    """Guards the window: history + prompt + reply <= 1000, the reply capped at 999, a history
    truncated to nothing leaving no key to look up (CachedAttention §3.5)."""
    s, _ = _sched([("a", prompt, output)], window=1000)
    if hist:
        s.session_context["a"] = hist
    j = s.make_job(0, 2.0)
    assert (j.hist, j.prompt, j.output, j.truncated, tuple(j.keys)) == want
    assert j.hist + j.prompt + j.output <= 1000 and j.ctx_in == j.hist + j.prompt and j.arrival == 2.0


@pytest.mark.parametrize("prompt, output, hashes, keys, truncated", [
    (1025, 10, list(range(10)), [0, 1], False),     # 1024 // 512 whole blocks, one token left over
    (1024, 10, list(range(10)), [0], False),        # two whole blocks would leave nothing to compute
    (512, 10, list(range(10)), [], False),
    (3000, 100, list(range(10)), [0, 1, 2], True),  # prompt cut to 2048 - 100 = 1948: 1947 // 512
    (1948, 100, [7], [7], False),                   # no more keys than hashes
])
def test_prefix_block_jobs_reuse_whole_blocks_leaving_one_token_to_compute(prompt, output, hashes, keys, truncated):
    """Guards Mooncake-style reuse: whole 512-token blocks of the (window-capped) prompt, at least
    one token computed, no session history."""
    s, _ = _sched([("r", prompt, output, hashes)], window=2048)
    j = s.make_job(0, 0.0)
    assert j.hashed and j.hist == 0 and list(j.keys) == keys and j.truncated == truncated
    assert j.prompt == min(prompt, 2048 - output)
    assert len(j.keys) * BLOCK_TOKENS < j.prompt


def test_reusable_block_keys_counts_whole_blocks_below_the_last_token():
    """Guards an off-by-one at block boundaries (hand-computed: 513 tokens -> 1 block)."""
    h = list(range(5))
    assert [len(reusable_block_keys(h, n)) for n in (0, 1, 512, 513, 1024, 1025, 10_000)] == [0, 0, 0, 1, 1, 2, 5]


def test_finished_turns_set_the_next_turns_history_but_blocks_do_not():
    """Guards a session's next turn seeing the wrong history (and block requests polluting it)."""
    s, _ = _sched([("a", 100, 10), ("r", 1025, 10, [1, 2, 3])])
    a, r = s.make_job(0, 0.0), s.make_job(1, 0.0)
    s.finished(a, 110)
    s.finished(r, 1035)
    assert s.session_context == {"a": 110}


# ---- the look-ahead window (§3.4) ------------------------------------------------------------------

def _job(i, keys):
    return Job(i, f"s{i}", float(i), keys, 1, 1, 1, False)


def test_lookahead_map_gives_each_key_its_first_position_in_the_window():
    """Guards positions (a key shared by two jobs is needed at the earlier one) and the window bound."""
    s, _ = _sched([("a", 10, 5)], **{"scheduler.lookahead_jobs": 2})
    for i, keys in enumerate([["x", "y"], ["y", "z"], ["w"]]):
        s.enqueue(_job(i, keys))
    assert s.lookahead_keys() == {"x": 0, "y": 0, "z": 1}


def test_lookahead_map_is_rebuilt_only_when_the_queue_changed():
    """Guards both a stale map after the queue moves and a rebuild on every call (the store asks
    for it at every eviction)."""
    s, _ = _sched([("a", 10, 5)] * 4, **{"scheduler.lookahead_jobs": 2})
    jobs = [_job(i, [k]) for i, k in enumerate("xyzw")]
    for j in jobs[:3]:
        s.enqueue(j)
    first = s.lookahead_keys()
    assert first == {"x": 0, "y": 1}
    jobs[1].keys = ["q"]                   # not a queue change: the cached map is served
    assert s.lookahead_keys() is first and first == {"x": 0, "y": 1}
    s.enqueue(jobs[3])
    assert s.lookahead_keys() == {"x": 0, "q": 1}
    assert _ids(s.next_batch(0.0, s.max_batch - 1)) == [0]   # room for one: the window slides
    assert s.lookahead_keys() == {"q": 0, "z": 1}


def test_a_zero_window_protects_nothing():
    """Guards a window of 0 jobs reading the queue's head anyway."""
    s, _ = _sched([("a", 10, 5)], **{"scheduler.lookahead_jobs": 0})
    s.enqueue(_job(0, ["x"]))
    assert s.lookahead_keys() == {}


def test_jobs_entering_the_window_are_prefetched_unless_admitted_at_once():
    """Guards scheduler-aware fetching (§3.4): window 2, one job per iteration. Jobs 0, 1 enter the
    window on arrival; job 0 is admitted at once (it loads layer-wise itself: no prefetch); admitting
    it slides job 2 into the window (prefetched now, t=5); job 1 waits (prefetched as of its
    arrival, t=1)."""
    turns = [("a", 10, 5), ("b", 10, 5), ("c", 10, 5)]
    s, store = _sched(turns, **{"scheduler.lookahead_jobs": 2, "scheduler.max_batch": 1})
    _enqueue(s, [0, 1, 2])
    assert _ids(s.next_batch(5.0, 0)) == [0]
    assert store.prefetched == [(2, 5.0), (1, 1.0)]
    assert _ids(s.next_batch(6.0, 0)) == [1]
    assert store.prefetched == [(2, 5.0), (1, 1.0)]   # nothing new entered the window


@pytest.mark.parametrize("over", [{"policy.kind": "hbm_prefix"}, {"policy.scheduler_aware_fetch": False},
                                  {"scheduler.lookahead_jobs": 0}])
def test_no_prefetch_without_scheduler_aware_fetch_on_a_host_store(over):
    """Guards prefetching for the HBM-only baseline, with the feature off, or with no window."""
    s, store = _sched([("a", 10, 5)] * 3, **{"scheduler.lookahead_jobs": 2, "scheduler.max_batch": 1, **over})
    _enqueue(s, [0, 1, 2])
    s.next_batch(5.0, 0)
    assert store.prefetched == []


def test_a_sliding_window_bounds_the_hbm_a_job_holds():
    """Guards sizing a job's HBM as per-token bytes x tokens for a model with sliding-window layers:
    4 layers of 200 bytes a token, two of them sliding over 100 tokens; a 1,000-token prompt with a
    200-token reply holds 200 x (2 x 1,200 + 2 x 100) = 520,000 bytes, not 960,000."""
    shape = ModelShape("toy-sliding", layers=4, hidden=50, heads=5, kv_heads=5, intermediate=100, vocab=100,
                       max_context_tokens=4096, sliding_window=100, full_attention_interval=2)
    cfg = load_config({}, {"model": "llama2-7b"})
    wl = SimpleNamespace(session=["a"], prompt_tokens=np.array([1000]), output_tokens=np.array([200]),
                         prefix_hashes=[None])
    s = PrefillFirstScheduler(cfg, shape, wl, StubStore())
    job = s.make_job(0, 0.0)
    s.plan(job)
    assert job.res_bytes == 520_000
