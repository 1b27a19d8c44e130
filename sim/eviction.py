"""Who leaves a full tier: scheduler-aware (CachedAttention §3.4), LRU or FIFO.

A policy is a small object asked for victims: it sees the tier's entries (in the order the tier
keeps them), the keys the scheduler's look-ahead window will read (key -> queue position) and the
cost model, so a cost-aware policy is written here and nowhere else. LRU and FIFO differ only in
the order a tier keeps (a hit refreshes recency under LRU). The scheduler-aware policy walks the
same recency order but skips entries that a job inside the look-ahead window will read soon; only
if every candidate is needed soon does it fall back to evicting the one needed last.
"""
from __future__ import annotations

from typing import List, Optional

from sim.tiers import Entry, Tier


class Eviction:
    """Base: evict in the tier's order (least recently used first, or first stored first)."""
    name = ""
    recency = True  # the tier keeps recency order: a hit moves the entry to the back
    uses_lookahead = False  # victims() wants the scheduler's look-ahead map

    def __init__(self, cost=None):
        self.cost = cost  # what a transfer costs, for policies that weigh reload cost

    def victims(self, tier: Tier, need_bytes: float, protected: Optional[dict] = None,
                after_pos: float = -1) -> List[Entry]:
        """Entries to evict, in order, until `need_bytes` would be free; busy entries are never chosen.
        Returns what it found even if that is not enough (the caller checks)."""
        freed = tier.free
        out: List[Entry] = []
        # the scan stops as soon as enough is found, so it touches only the cold end of the order
        for e in tier.entries.values():
            if freed >= need_bytes:
                return out
            if e.users:
                continue
            freed += e.nbytes
            out.append(e)
        return out


class Lru(Eviction):
    name = "lru"


class Fifo(Eviction):
    name = "fifo"
    recency = False


class SchedulerAware(Eviction):
    """CachedAttention §3.4: keep what the queue's look-ahead window will read.

    `protected` maps key -> queue position (smaller = needed sooner). Protected entries are given up
    only if needed after queue position `after_pos`: a prefetch for the job at position p must not
    push out the KV of a job that runs before it.
    """
    name = "scheduler_aware"
    uses_lookahead = True

    def victims(self, tier, need_bytes, protected=None, after_pos=-1):
        if protected is None:
            return super().victims(tier, need_bytes)
        freed = tier.free
        out: List[Entry] = []
        held_back = []
        for e in tier.entries.values():
            if freed >= need_bytes:
                return out
            if e.users:
                continue
            if e.key in protected:
                held_back.append(e)
                continue
            freed += e.nbytes
            out.append(e)
        # everything left is wanted by the queue: evict the entries wanted last first
        held_back.sort(key=lambda e: -protected[e.key])
        for e in held_back:
            if freed >= need_bytes or protected[e.key] <= after_pos:
                break
            freed += e.nbytes
            out.append(e)
        return out


POLICIES = {p.name: p for p in (SchedulerAware, Lru, Fifo)}


def eviction_for(name: str, store_kind: str, cost=None) -> Eviction:
    """The policy a config names. Scheduler-aware eviction is AttentionStore's (§3.4): the HBM-only
    prefix cache it is compared with evicts by recency, as vLLM/SGLang do, whatever is configured."""
    if name == "scheduler_aware" and store_kind != "attentionstore":
        name = "lru"
    return POLICIES[name](cost)
