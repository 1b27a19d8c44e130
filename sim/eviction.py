"""Who leaves a full tier: scheduler-aware (CachedAttention §3.4), LRU or FIFO.

LRU and FIFO differ only in the order a tier keeps (a hit refreshes recency under LRU). The
scheduler-aware policy walks the same recency order but skips entries that a job inside the
queue's look-ahead window (or a running job) will read soon; only if every candidate is needed
soon does it fall back to plain recency, evicting the one needed last.
"""
from __future__ import annotations

from typing import List, Optional

from sim.tiers import Entry, Tier


def victims(tier: Tier, need_bytes: float, protected: Optional[dict], after_pos: float = -1) -> List[Entry]:
    """Entries to evict, in order, until `need_bytes` would be free; busy entries are never chosen.
    Returns what it found even if that is not enough (the caller checks).

    `protected` maps key -> queue position (smaller = needed sooner); None disables the
    scheduler-aware skip (LRU / FIFO). Protected entries are given up only if needed after
    queue position `after_pos`: a prefetch for the job at position p must not push out the KV
    of a job that runs before it.
    """
    freed = tier.free
    out: List[Entry] = []
    held_back = []
    # the scan stops as soon as enough is found, so it touches only the cold end of the order
    for e in tier.entries.values():
        if freed >= need_bytes:
            return out
        if e.users:
            continue
        if protected is not None and e.key in protected:
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
