"""Eviction policies and tier accounting on small tiers built by hand (sim/eviction.py, sim/tiers.py).

Every tier here holds entries of round byte sizes, so the victims and the freed bytes are read off
the set-up: no simulation runs.
"""

import pytest

from sim.eviction import Fifo, Lru, SchedulerAware, eviction_for
from sim.tiers import Entry, Tier


def _tier(capacity, sizes, recency=True, reserved=0.0):
    """A tier holding one entry per (key, bytes), added in the given order."""
    t = Tier("t", capacity, recency)
    t.reserved = reserved
    for key, nbytes in sizes:
        t.add(Entry(key, int(nbytes), float(nbytes), None, 0.0))
    return t


def _keys(entries):
    return [e.key for e in entries]


# ---- LRU and FIFO -----------------------------------------------------------------------------

def test_lru_evicts_the_least_recently_touched_first():
    """Guards a hit that does not refresh recency (LRU degenerating into FIFO)."""
    t = _tier(100, [("a", 30), ("b", 30), ("c", 30)])   # free 10
    t.touch(t.entries["a"])                              # order now b, c, a
    # need 50: b frees 10 + 30 = 40, c brings it to 70
    assert _keys(Lru().victims(t, 50)) == ["b", "c"]


def test_fifo_ignores_touches_and_evicts_the_first_stored():
    """Guards a FIFO tier reordered by hits (FIFO degenerating into LRU)."""
    t = _tier(100, [("a", 30), ("b", 30), ("c", 30)], recency=Fifo.recency)
    t.touch(t.entries["a"])
    assert list(t.entries) == ["a", "b", "c"]
    assert _keys(Fifo().victims(t, 50)) == ["a", "b"]


def test_victims_stop_as_soon_as_enough_is_free():
    """Guards over-eviction: one 30-byte victim suffices for 40 bytes when 10 are already free."""
    t = _tier(100, [("a", 30), ("b", 30), ("c", 30)])
    assert _keys(Lru().victims(t, 40)) == ["a"]
    assert Lru().victims(t, 10) == []   # the free 10 bytes already suffice: nobody leaves


def test_busy_entries_are_never_victims():
    """Guards evicting KV that a running job reads or appends to."""
    t = _tier(100, [("a", 30), ("b", 30), ("c", 30)])
    t.entries["b"].users = 1
    assert _keys(Lru().victims(t, 50)) == ["a", "c"]


def test_not_enough_returns_everything_it_found():
    """Guards a policy that returns nothing (or raises) when the need cannot be met: the caller
    decides; here everything not busy (a: 30, c: 30) frees 70 of the 200 asked."""
    t = _tier(100, [("a", 30), ("b", 30), ("c", 30)])
    t.entries["b"].users = 2
    out = Lru().victims(t, 200)
    assert _keys(out) == ["a", "c"]
    assert t.free + sum(e.nbytes for e in out) == 70


def test_reserved_bytes_count_as_not_free():
    """Guards victims computed from capacity - used alone (HBM held by running jobs ignored)."""
    t = _tier(100, [("a", 30), ("b", 30)], reserved=30)   # free 10
    assert _keys(Lru().victims(t, 40)) == ["a"]
    assert _keys(Lru().victims(t, 41)) == ["a", "b"]


# ---- scheduler-aware (CachedAttention §3.4) -------------------------------------------------------

def _four():
    return _tier(100, [("a", 25), ("b", 25), ("c", 25), ("d", 25)])   # full


def test_scheduler_aware_skips_keys_the_queue_will_read():
    """Guards the look-ahead map being ignored (it would evict a and b, in LRU order)."""
    t = _four()
    assert _keys(SchedulerAware().victims(t, 30, {"a": 0, "c": 5})) == ["b", "d"]


def test_scheduler_aware_gives_up_protected_keys_wanted_last_first():
    """Guards the fall-back order: when the unprotected entries are not enough, the entry wanted
    last (c, queue position 5) leaves before the one wanted next (a, position 0)."""
    t = _four()
    assert _keys(SchedulerAware().victims(t, 80, {"a": 0, "c": 5})) == ["b", "d", "c", "a"]
    # 75 bytes suffice after c: a stays
    assert _keys(SchedulerAware().victims(t, 75, {"a": 0, "c": 5})) == ["b", "d", "c"]


def test_scheduler_aware_never_gives_up_keys_needed_at_or_before_after_pos():
    """Guards a prefetch for the job at position p pushing out the KV of a job that runs before it:
    only entries wanted strictly after `after_pos` may go; it then returns too little."""
    t = _four()
    prot = {"a": 0, "c": 5}
    assert _keys(SchedulerAware().victims(t, 80, prot, after_pos=0)) == ["b", "d", "c"]
    assert _keys(SchedulerAware().victims(t, 80, prot, after_pos=5)) == ["b", "d"]
    assert _keys(SchedulerAware().victims(t, 80, prot, after_pos=4.5)) == ["b", "d", "c"]


def test_scheduler_aware_skips_busy_protected_entries_too():
    """Guards a busy entry slipping in through the held-back list."""
    t = _four()
    t.entries["c"].users = 1
    assert _keys(SchedulerAware().victims(t, 100, {"a": 0, "c": 5})) == ["b", "d", "a"]


def test_scheduler_aware_without_a_map_is_lru():
    """Guards a crash (or a different order) when no look-ahead map is given."""
    t = _four()
    t.touch(t.entries["a"])
    assert _keys(SchedulerAware().victims(t, 50, None)) == ["b", "c"]


def test_scheduler_aware_follows_recency_among_unprotected_entries():
    """Guards a scan in insertion order rather than the tier's recency order."""
    t = _four()
    t.touch(t.entries["b"])            # order a, c, d, b
    assert _keys(SchedulerAware().victims(t, 50, {"a": 1})) == ["c", "d"]


# ---- which policy a config gets ---------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, want", [
    ("scheduler_aware", "attentionstore", SchedulerAware),
    ("scheduler_aware", "hbm_prefix", Lru),     # the vLLM-like baseline evicts by recency
    ("scheduler_aware", "recompute", Lru),
    ("lru", "attentionstore", Lru),
    ("fifo", "attentionstore", Fifo),
    ("fifo", "hbm_prefix", Fifo),
])
def test_eviction_for_maps_config_names_to_policies(name, kind, want):
    """Guards the HBM-only baseline getting AttentionStore's look-ahead eviction."""
    cost = object()
    p = eviction_for(name, kind, cost)
    assert type(p) is want and p.cost is cost
    assert p.uses_lookahead == (want is SchedulerAware)
    assert p.recency == (want is not Fifo)


# ---- tier accounting --------------------------------------------------------------------------------

def test_tier_used_free_and_peak_follow_adds_grows_and_removes():
    """Guards the byte accounting every capacity check relies on; peak counts reserved HBM too and
    never falls."""
    t = Tier("hbm", 100.0, True)
    t.reserved = 20.0
    a = Entry("a", 3, 30.0, None, 0.0)
    t.add(a)
    assert (t.used, t.free, t.peak) == (30.0, 50.0, 50.0)
    assert a.tier is t and list(t.entries) == ["a"]
    t.grow(a, 5, 45.0)
    assert (a.tokens, a.nbytes) == (5, 45.0)
    assert (t.used, t.free, t.peak) == (45.0, 35.0, 65.0)
    t.grow(a, 2, 10.0)                       # shrinking frees bytes, the peak stays
    assert (t.used, t.free, t.peak) == (10.0, 70.0, 65.0)
    b = Entry("b", 1, 15.0, None, 0.0)
    t.add(b)
    t.remove(a)
    assert (t.used, t.free, t.peak) == (15.0, 65.0, 65.0)
    assert a.tier is None and list(t.entries) == ["b"]


def test_touch_moves_an_entry_to_the_back_only_under_recency():
    """Guards touch() reordering a FIFO tier or failing to reorder an LRU one."""
    lru = _tier(100, [("a", 1), ("b", 1), ("c", 1)], recency=True)
    lru.touch(lru.entries["a"])
    assert list(lru.entries) == ["b", "c", "a"]
    fifo = _tier(100, [("a", 1), ("b", 1), ("c", 1)], recency=False)
    fifo.touch(fifo.entries["a"])
    assert list(fifo.entries) == ["a", "b", "c"]
