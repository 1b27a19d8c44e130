"""The KV store on its own (sim/kvstore.py): tiers, links, eviction, prefetch, saves, HBM releases.

A toy shape makes the numbers round: 5 layers x 200 bytes = 1000 bytes of KV per token, so 1000
tokens are 1 MB. Links run at constant speeds (a roofline has no chunk-size curve): SSD writes 1 GB/s
(1 ms per MB), SSD reads 2 GB/s (0.5 ms per MB). The store is built directly, with a fake
look-ahead callable; no scheduler or engine runs.
"""

import math

import pytest

from sim.costmodel import RooflineCost
from sim.eviction import Lru, SchedulerAware
from sim.kvstore import KVStore
from sim.models import ModelShape
from sim.scheduler import Job
from sim.tiers import DRAM, HBM, MISS, NONE, SSD, Entry
from sim.trace import BLOCK_TOKENS
from sim.units import GB, MB

SHAPE = ModelShape("toy", layers=5, hidden=50, heads=5, kv_heads=5, intermediate=100, vocab=100,
                   max_context_tokens=4096)
TOK = 1000.0   # bytes of KV per token
COST = RooflineCost(SHAPE, 1, peak_flops=1e12, hbm_bw_gbps=1000.0, prefill_mfu=1.0, decode_mbu=1.0,
                    h2d_gbps=10.0, d2h_gbps=10.0, ssd_read_gbps=2.0, ssd_write_gbps=1.0)
MS_PER_MB_WRITE = 1e-3
MS_PER_MB_READ = 0.5e-3


def test_the_toy_shape_has_round_numbers():
    """Guards the premise of every hand-computed figure below."""
    assert SHAPE.kv_bytes_per_token == TOK and SHAPE.layers == 5
    assert COST.ssd_write_bw(1.0) == 1 * GB and COST.ssd_read_bw(1.0) == 2 * GB


def _store(dram=0.0, ssd=0.0, hbm=100 * MB, kind="attentionstore", eviction=None, lookahead=None,
           decoupled=True, contention="none"):
    return KVStore(kind, hbm, dram, ssd, SHAPE, COST, eviction or Lru(), 0.0, contention, decoupled,
                   lookahead or (lambda: {}))


def _place(store, key, tokens, tier, ready_at=0.0):
    """Put an entry of `tokens` tokens in `tier` (and the index), as a finished save would."""
    e = Entry(key, tokens, tokens * TOK, tier, ready_at)
    tier.add(e)
    store.index[key] = e
    return e


def _job(sid="s", hist=0, prompt=100, output=10, truncated=False, keys=None, hashed=False, hit=0, entries=()):
    if keys is None:
        keys = (sid,) if hist else ()
    j = Job(0, sid, 0.0, keys, hist, prompt, output, truncated, hashed)
    j.hit, j.hit_entries = hit, list(entries)
    return j


def _consistent(store):
    """Every indexed entry sits in exactly the tier it names, and every tier entry is indexed."""
    tiers = (store.hbm, store.dram, store.ssd)
    for key, e in store.index.items():
        assert e.tier is not None and e.tier.entries.get(key) is e
    for t in tiers:
        for key, e in t.entries.items():
            assert store.index.get(key) is e
        assert t.used == pytest.approx(sum(e.nbytes for e in t.entries.values()))
        assert t.used <= t.capacity


# ---- make_room -------------------------------------------------------------------------------

@pytest.mark.parametrize("ssd_busy_until", [0.0, 5.0])
def test_make_room_moves_dram_victims_to_ssd_and_queues_their_writes(ssd_busy_until):
    """Guards DRAM victims being dropped instead of demoted, and their SSD writes not queueing
    (FIFO) behind a write already in flight: two 1 MB writes at 1 GB/s take 2 ms."""
    st = _store(dram=3 * MB, ssd=10 * MB)
    a, b, c = (_place(st, k, 1000, st.dram) for k in "abc")
    if ssd_busy_until:
        st.ssd_w.transfer(0.0, ssd_busy_until * GB, 1 * GB)
    assert st.make_room(st.dram, 2 * MB, now=1.0)
    assert (a.tier, b.tier, c.tier) == (st.ssd, st.ssd, st.dram)
    assert set(st.index) == {"a", "b", "c"}
    start = max(1.0, ssd_busy_until)
    assert st.ssd_w.free_at == pytest.approx(start + 2 * MS_PER_MB_WRITE, rel=1e-12)
    assert st.ssd_w.bytes_moved == ssd_busy_until * GB + 2 * MB
    assert st.evictions == {"hbm": 0, "dram": 2, "ssd": 0}
    assert st.dram.free == 2 * MB and st.ssd.used == 2 * MB
    _consistent(st)


def test_make_room_drops_ssd_victims_to_fit_a_demoted_dram_entry():
    """Guards the cascade: DRAM victim a goes to a full SSD, whose own LRU victim d is dropped."""
    st = _store(dram=2 * MB, ssd=1 * MB)
    a = _place(st, "a", 1000, st.dram)
    _place(st, "b", 1000, st.dram)
    _place(st, "d", 1000, st.ssd)
    assert st.make_room(st.dram, 1 * MB, now=0.0)
    assert a.tier is st.ssd and "d" not in st.index
    assert st.evictions == {"hbm": 0, "dram": 1, "ssd": 1}
    assert st.ssd_w.free_at == pytest.approx(MS_PER_MB_WRITE)
    _consistent(st)


@pytest.mark.parametrize("ssd", [0.0, 0.5 * MB])
def test_a_dram_victim_the_ssd_cannot_hold_is_dropped_without_a_write(ssd):
    """Guards a write charged (or an entry kept) for a victim that cannot go anywhere."""
    st = _store(dram=1 * MB, ssd=ssd)
    _place(st, "a", 1000, st.dram)
    assert st.make_room(st.dram, 1 * MB, now=0.0)
    assert st.index == {} and st.ssd_w.bytes_moved == 0.0 and st.ssd_w.free_at == 0.0
    _consistent(st)


def test_hbm_victims_are_dropped_not_moved_to_the_host():
    """Guards the HBM-only prefix cache spilling into a host tier it does not have."""
    st = _store(kind="hbm_prefix", hbm=2 * MB, dram=10 * MB, ssd=10 * MB)
    assert st.dram.capacity == 0.0 and st.ssd.capacity == 0.0   # no host tiers for hbm_prefix
    x = _place(st, "x", 1000, st.hbm)
    _place(st, "y", 1000, st.hbm)
    assert st.make_room(st.hbm, 1 * MB, now=0.0)
    assert "x" not in st.index and x.tier is None and list(st.hbm.entries) == ["y"]
    assert st.evictions["hbm"] == 1 and st.ssd_w.bytes_moved == 0.0
    _consistent(st)


def test_make_room_refuses_more_than_capacity_and_an_empty_tier_without_evicting():
    """Guards evicting everything for a request that can never fit."""
    st = _store(dram=3 * MB, ssd=10 * MB)
    _place(st, "a", 1000, st.dram)
    assert not st.make_room(st.dram, 3.5 * MB, now=0.0)
    assert st.index["a"].tier is st.dram and st.evictions["dram"] == 0
    st.hbm.reserved = st.hbm.capacity - 1 * MB      # HBM held by running jobs, nothing cached
    assert not st.make_room(st.hbm, 2 * MB, now=0.0)


def test_scheduler_aware_make_room_spills_rather_than_evicting_queued_kv():
    """Guards make_room ignoring the look-ahead map by default: a save must not push out the KV
    of a queued job (q, at position 0) while an unqueued entry (o) can go."""
    st = _store(dram=2 * MB, ssd=10 * MB, eviction=SchedulerAware(), lookahead=lambda: {"q": 0})
    q = _place(st, "q", 1000, st.dram)
    o = _place(st, "o", 1000, st.dram)
    assert st.make_room(st.dram, 1 * MB, now=0.0)
    assert q.tier is st.dram and o.tier is st.ssd
    # both wanted by the queue: nothing is given up by default (after_pos = inf) and it fails
    st2 = _store(dram=2 * MB, ssd=10 * MB, eviction=SchedulerAware(), lookahead=lambda: {"q": 0, "o": 1})
    _place(st2, "q", 1000, st2.dram)
    _place(st2, "o", 1000, st2.dram)
    assert not st2.make_room(st2.dram, 1 * MB, now=0.0)
    assert set(st2.dram.entries) == {"q", "o"}


# ---- prefetch (CachedAttention §3.4) ------------------------------------------------------------

@pytest.mark.parametrize("read_busy_until", [0.0, 3.0])
def test_prefetch_moves_ssd_kv_to_dram_ready_when_its_read_ends(read_busy_until):
    """Guards the prefetched entry's ready time: 1 MB at 2 GB/s = 0.5 ms after the SSD read link
    frees (at the prefetch's time, or behind an earlier read)."""
    st = _store(dram=2 * MB, ssd=10 * MB)
    e = _place(st, "s", 1000, st.ssd)
    if read_busy_until:
        st.ssd_r.transfer(0.0, read_busy_until * 2 * GB, 2 * GB)
    st.prefetch(_job("s", hist=1000), now=2.0)
    assert e.tier is st.dram and st.index["s"] is e
    assert e.ready_at == pytest.approx(max(2.0, read_busy_until) + MS_PER_MB_READ, rel=1e-12)
    assert st.ssd.used == 0.0 and st.dram.used == 1 * MB
    assert st.ssd_r.bytes_moved == read_busy_until * 2 * GB + 1 * MB
    _consistent(st)


def test_prefetch_skips_busy_entries_and_stops_at_the_first_missing_block():
    """Guards prefetching KV a running job is reading, and prefetching blocks past a gap (they
    cannot be reused: reuse is of the leading run of blocks)."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    h0 = _place(st, 10, 512, st.dram)
    h1 = _place(st, 11, 512, st.ssd)
    h3 = _place(st, 13, 512, st.ssd)
    st.prefetch(_job("r", keys=[10, 11, 12, 13], hashed=True), now=1.0)
    assert (h0.tier, h1.tier, h3.tier) == (st.dram, st.dram, st.ssd)
    assert h1.ready_at == pytest.approx(1.0 + 512 * TOK / (2 * GB))
    busy = _place(st, "s", 1000, st.ssd)
    busy.users = 1
    st.prefetch(_job("s", hist=1000), now=1.0)
    assert busy.tier is st.ssd
    _consistent(st)


@pytest.mark.parametrize("queued_pos, moved", [(0, False), (5, True)])
def test_prefetch_never_evicts_kv_of_a_job_ahead_of_it(queued_pos, moved):
    """Guards after_pos: a prefetch for the job at position 3 may evict the DRAM copy of a job
    behind it (position 5, demoted to SSD) but not of one ahead of it (position 0)."""
    st = _store(dram=1 * MB, ssd=10 * MB, eviction=SchedulerAware(), lookahead=lambda: {"q": queued_pos, "s": 3})
    q = _place(st, "q", 1000, st.dram)
    e = _place(st, "s", 1000, st.ssd)
    st.prefetch(_job("s", hist=1000), now=1.0)
    if moved:
        assert q.tier is st.ssd and e.tier is st.dram
        assert st.ssd_w.free_at == pytest.approx(1.0 + MS_PER_MB_WRITE)
        assert e.ready_at == pytest.approx(1.0 + MS_PER_MB_READ)
    else:
        assert q.tier is st.dram and e.tier is st.ssd
        assert st.ssd_r.bytes_moved == 0.0 and st.ssd_w.bytes_moved == 0.0
    _consistent(st)


def test_making_room_for_a_prefetch_never_evicts_the_entry_being_prefetched():
    """Guards the double removal: DRAM (1 MB) holds v, SSD (1 MB) holds s; prefetching s must demote
    or drop v, never s. With s pinned during make_room, v cannot go to the full SSD and is dropped;
    s ends in DRAM, ready 0.5 ms after the prefetch."""
    st = _store(dram=1 * MB, ssd=1 * MB)            # LRU: no look-ahead map protects s
    _place(st, "v", 1000, st.dram)
    e = _place(st, "s", 1000, st.ssd)
    st.prefetch(_job("s", hist=1000), now=1.0)
    assert e.tier is st.dram and st.index["s"] is e
    assert e.ready_at == pytest.approx(1.0 + MS_PER_MB_READ)
    _consistent(st)


# ---- saving (§3.3) ---------------------------------------------------------------------------

def test_save_of_a_new_history_writes_it_all_to_dram():
    """Guards the bytes written for a first turn (its whole context) and the entry's ready time."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    assert st.save_to_host(_job("s"), 1000, now=1.0, hashes=None) == 1 * MB
    e = st.index["s"]
    assert (e.tier, e.tokens, e.nbytes, e.ready_at) == (st.dram, 1000, 1 * MB, 1.0)
    assert st.ssd_w.bytes_moved == 0.0


@pytest.mark.parametrize("now, ready", [(2.0, 5.0), (6.0, 6.0)])
def test_save_grows_a_dram_history_by_the_new_tokens_only(now, ready):
    """Guards rewriting the reused part: 1000 tokens already in DRAM, context now 1500: 0.5 MB
    written; the entry stays ready no earlier than a write-back still in flight."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    e = _place(st, "s", 1000, st.dram, ready_at=5.0)
    assert st.save_to_host(_job("s", hist=1000, hit=1000, entries=[e]), 1500, now, None) == 0.5 * MB
    assert (e.tokens, e.nbytes, e.ready_at) == (1500, 1.5 * MB, ready)
    assert st.dram.used == 1.5 * MB


def test_growing_a_dram_history_evicts_others_never_itself():
    """Guards the entry being grown from being its own victim (it is the least recent here): the
    other entry o is demoted to SSD (a 1 ms write) and 0.5 MB is written."""
    st = _store(dram=2 * MB, ssd=10 * MB)
    e = _place(st, "s", 1000, st.dram)
    o = _place(st, "o", 1000, st.dram)
    assert st.save_to_host(_job("s", hist=1000, hit=1000, entries=[e]), 1500, 3.0, None) == 0.5 * MB
    assert e.tier is st.dram and e.tokens == 1500 and o.tier is st.ssd
    assert st.ssd_w.free_at == pytest.approx(3.0 + MS_PER_MB_WRITE)
    _consistent(st)


def test_a_history_too_big_for_dram_spills_to_ssd():
    """Guards the spill path and its write: 2 MB at 1 GB/s ends 2 ms later."""
    st = _store(dram=1 * MB, ssd=10 * MB)
    assert st.save_to_host(_job("s"), 2000, now=1.0, hashes=None) == 2 * MB
    assert st.index["s"].tier is st.ssd
    assert st.ssd_w.free_at == pytest.approx(1.0 + 2 * MS_PER_MB_WRITE)


def test_a_history_on_ssd_is_appended_to_when_dram_cannot_take_it():
    """Guards rewriting the whole history: 1000 tokens on SSD, context 1300: 0.3 MB written (0.3 ms)."""
    st = _store(dram=0.0, ssd=10 * MB)
    e = _place(st, "s", 1000, st.ssd)
    assert st.save_to_host(_job("s", hist=1000, hit=1000, entries=[e]), 1300, 1.0, None) == 0.3 * MB
    n = st.index["s"]
    assert (n.tier, n.tokens, st.ssd.used) == (st.ssd, 1300, 1.3 * MB)
    assert st.ssd_w.free_at == pytest.approx(1.0 + 0.3 * MS_PER_MB_WRITE)
    assert st.ssd_w.bytes_moved == 0.3 * MB


def test_a_history_on_ssd_moves_whole_to_dram_when_dram_has_room():
    """Guards the bytes of that move (the whole 1.3 MB context crosses D2H) and a stale SSD copy."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    e = _place(st, "s", 1000, st.ssd)
    assert st.save_to_host(_job("s", hist=1000, hit=1000, entries=[e]), 1300, 1.0, None) == 1.3 * MB
    assert st.index["s"].tier is st.dram and st.ssd.used == 0.0 and st.ssd_w.bytes_moved == 0.0
    _consistent(st)


def test_a_history_that_fits_nowhere_writes_nothing():
    """Guards reporting bytes saved (or overfilling a tier) when neither tier can hold the context."""
    st = _store(dram=0.0, ssd=1 * MB)
    assert st.save_to_host(_job("s"), 2000, now=1.0, hashes=None) == 0.0
    assert st.ssd_w.bytes_moved == 0.0 and "s" not in st.index
    _consistent(st)


def test_prefix_blocks_save_only_new_whole_blocks_of_the_prompt():
    """Guards block saves: a 1100-token prompt has 2 whole blocks; block 10 is already stored (it
    is only refreshed), block 11 is new (512 tokens = 0.512 MB), block 12 is past the prompt."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    _place(st, 10, BLOCK_TOKENS, st.dram)
    _place(st, "z", 1, st.dram)
    job = _job("r", prompt=1100, keys=[10], hashed=True)
    assert st.save_to_host(job, 1110, now=1.0, hashes=[10, 11, 12]) == BLOCK_TOKENS * TOK
    assert list(st.dram.entries) == ["z", 10, 11]
    assert 12 not in st.index


# ---- keep in HBM (the HBM-only prefix cache) ------------------------------------------------------

def test_keep_in_hbm_stores_the_finished_context_evicting_by_recency():
    """Guards the vLLM-like baseline: a finished turn's 2000 tokens stay in HBM, the least recently
    used history (b: a was read after it) leaving to make room; nothing crosses to the host."""
    st = _store(kind="hbm_prefix", hbm=3 * MB)
    a = _place(st, "a", 1000, st.hbm)
    _place(st, "b", 1000, st.hbm)
    st.hbm.touch(a)
    st.keep_in_hbm(_job("c"), 2000, now=1.0, hashes=None)
    assert list(st.hbm.entries) == ["a", "c"] and st.index["c"].nbytes == 2 * MB
    assert "b" not in st.index and st.d2h.bytes_moved == 0.0
    _consistent(st)


def test_keep_in_hbm_of_blocks_adds_new_blocks_and_refreshes_known_ones():
    """Guards duplicate block entries and a missing recency refresh."""
    st = _store(kind="hbm_prefix", hbm=10 * MB)
    _place(st, 10, BLOCK_TOKENS, st.hbm)
    _place(st, "z", 1, st.hbm)
    st.keep_in_hbm(_job("r", prompt=1024, keys=[10], hashed=True), 1030, now=1.0, hashes=[10, 11, 12])
    assert list(st.hbm.entries) == ["z", 10, 11]
    assert st.hbm.used == 2 * BLOCK_TOKENS * TOK + TOK


# ---- lookup ------------------------------------------------------------------------------------

def test_lookup_reuses_at_most_the_kept_history():
    """Guards a hit larger than the (truncated) history the job keeps."""
    st = _store(dram=10 * MB)
    e = _place(st, "s", 1000, st.dram)
    assert st.lookup(_job("s", hist=1000)) == (1000, [e])
    assert st.lookup(_job("s", hist=800, truncated=True)) == (800, [e])


def test_lookup_invalidates_a_truncated_history_unless_positions_are_decoupled():
    """Guards reusing KV whose baked-in positions are wrong after truncation (CachedAttention §3.5)."""
    st = _store(dram=10 * MB, decoupled=False)
    _place(st, "s", 1000, st.dram)
    assert st.lookup(_job("s", hist=800, truncated=True)) == (0, [])
    assert "s" not in st.index and st.dram.used == 0.0
    kept = _store(dram=10 * MB, decoupled=False)
    e = _place(kept, "s", 1000, kept.dram)
    assert kept.lookup(_job("s", hist=1000)) == (1000, [e])   # not truncated: still valid


def test_lookup_finds_nothing_for_recompute_or_a_job_without_keys():
    """Guards recompute reusing KV and a first turn matching a stale entry."""
    st = _store(kind="recompute")
    _place(st, "s", 1000, st.hbm)
    assert st.lookup(_job("s", hist=1000)) == (0, [])
    st2 = _store(dram=10 * MB)
    _place(st2, "s", 1000, st2.dram)
    assert st2.lookup(_job("s", hist=0)) == (0, [])


def test_lookup_of_blocks_reuses_the_leading_run_only():
    """Guards counting a block after a gap: blocks 10, 11 present, 12 missing, 13 present -> 1024."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    a = _place(st, 10, BLOCK_TOKENS, st.dram)
    b = _place(st, 11, BLOCK_TOKENS, st.ssd)
    _place(st, 13, BLOCK_TOKENS, st.dram)
    assert st.lookup(_job("r", keys=[10, 11, 12, 13], hashed=True)) == (2 * BLOCK_TOKENS, [a, b])


# ---- where a hit loads from -------------------------------------------------------------------------

def test_hit_sources_charge_the_reused_share_of_each_tier():
    """Guards the bytes loaded: 500 of 1000 DRAM tokens = 0.5 MB (x 0.5 under Round Attention's
    factor), ready when the DRAM copy is; an SSD hit loads from SSD; no entry is a miss."""
    st = _store(dram=10 * MB, ssd=10 * MB)
    e = _place(st, "s", 1000, st.dram, ready_at=4.0)
    job = _job("s", hist=500, hit=500, entries=[e])
    assert st.hit_sources(job, 1.0) == (DRAM, 0.5 * MB, 0.0, 4.0)
    assert st.hit_sources(job, 0.5) == (DRAM, 0.25 * MB, 0.0, 4.0)
    f = _place(st, "t", 1000, st.ssd)
    assert st.hit_sources(_job("t", hist=1000, hit=1000, entries=[f]), 1.0) == (SSD, 0.0, 1 * MB, 0.0)
    assert st.hit_sources(_job("u", hist=1000), 1.0)[0] == MISS
    assert st.hit_sources(_job("u"), 1.0)[0] == NONE
    h = _store(kind="hbm_prefix")
    g = _place(h, "s", 1000, h.hbm)
    assert h.hit_sources(_job("s", hist=1000, hit=1000, entries=[g]), 1.0) == (HBM, 0.0, 0.0, 0.0)


# ---- HBM held by running jobs ------------------------------------------------------------------

def test_admit_reserves_hbm_and_pins_hits_and_a_refusal_unpins():
    """Guards a refused job leaving its hits pinned forever (never evictable again)."""
    st = _store(dram=10 * MB, hbm=10 * MB)
    e = _place(st, "s", 1000, st.dram)
    job = _job("s", hist=1000, hit=1000, entries=[e])
    job.res_bytes = 4 * MB
    assert st.admit(job, 0.0)
    assert st.hbm.reserved == 4 * MB and e.users == 1 and st.hbm.peak == 4 * MB
    big = _job("s", hist=1000, hit=1000, entries=[e])
    big.res_bytes = 7 * MB
    assert not st.admit(big, 0.0)
    assert st.hbm.reserved == 4 * MB and e.users == 1


def test_admit_evicts_cached_hbm_kv_but_not_the_jobs_own_hit():
    """Guards the pin-before-evict order: x (the job's hit, least recent) must survive; y goes."""
    st = _store(kind="hbm_prefix", hbm=3 * MB)
    x = _place(st, "x", 1000, st.hbm)
    y = _place(st, "y", 1000, st.hbm)
    job = _job("x", hist=1000, hit=1000, entries=[x])
    job.res_bytes = 2 * MB
    assert st.admit(job, 0.0)
    assert x.tier is st.hbm and y.tier is None and st.hbm.reserved == 2 * MB
    assert st.hbm.free == 0.0


def test_release_frees_hbm_now_or_when_the_write_back_ends():
    """Guards HBM freed before an asynchronous save has drained it, and releases out of time order."""
    st = _store()
    st.hbm.reserved = 5 * MB
    st.release(2 * MB, at=3.0, now=1.0)
    st.release(1 * MB, at=2.0, now=1.0)
    assert st.hbm.reserved == 5 * MB and st.next_release_s() == 2.0
    st.take_releases(1.5)
    assert st.hbm.reserved == 5 * MB
    st.take_releases(2.0)
    assert st.hbm.reserved == 4 * MB and st.next_release_s() == 3.0
    st.release(1 * MB, at=0.5, now=1.0)            # write-back already over: freed at once
    assert st.hbm.reserved == 3 * MB and st.next_release_s() == 3.0
    st.take_releases(10.0)
    assert st.hbm.reserved == 1 * MB and st.next_release_s() == math.inf


# ---- sliding-window layers ------------------------------------------------------------------------

# 4 layers of 200 bytes a token, every second one sliding over the last 100 tokens: a context of n
# tokens holds 200 x (2 n + 2 min(n, 100)) bytes
SLIDING = ModelShape("toy-sliding", layers=4, hidden=50, heads=5, kv_heads=5, intermediate=100, vocab=100,
                     max_context_tokens=4096, sliding_window=100, full_attention_interval=2)


def _sliding_store(dram=100 * MB):
    cost = RooflineCost(SLIDING, 1, 1e12, 1000.0, 1.0, 1.0, 10.0, 10.0, 2.0, 1.0)
    return KVStore("attentionstore", 100 * MB, dram, 0.0, SLIDING, cost, Lru(), 0.0, "none", True, lambda: {})


def test_a_sliding_window_bounds_a_saved_history_and_its_growth():
    """Guards the store sizing a gpt-oss-like history as per-token bytes x tokens: 1,000 tokens hold
    200 x (2,000 + 200) = 440,000 bytes, not 800,000; a next turn to 1,500 tokens writes its 500 new
    tokens on the full layers and a window's worth on the sliding ones, 200 x (1,000 + 200)."""
    st = _sliding_store()
    assert st.save_to_host(_job("s", prompt=1000), 1000, 0.0, None) == 440_000
    assert st.index["s"].nbytes == 440_000
    e = st.index["s"]
    j = _job("s", hist=1000, prompt=500, hit=1000, entries=[e])
    assert st.save_to_host(j, 1500, 1.0, None) == 240_000
    assert e.nbytes == 200 * (3000 + 200) == 640_000
    _consistent(st)


def test_a_sliding_window_bounds_what_a_hit_loads():
    """Guards loading the whole context's bytes for sliding layers: a 1,000-token hit from DRAM loads
    440,000 bytes."""
    st = _sliding_store()
    e = _place(st, "s", 1000, st.dram)
    e.nbytes = st.dram.used = SLIDING.kv_bytes(1000)
    code, dram_b, ssd_b, _ = st.hit_sources(_job("s", hist=1000, hit=1000, entries=[e]), 1.0)
    assert (code, dram_b, ssd_b) == (DRAM, 440_000, 0.0)
