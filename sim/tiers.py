"""Where KV lives: capacity-bounded tiers (HBM, host DRAM, SSD) and the links that move it.

A link is a FIFO server with one transfer in flight at a time; since every transfer's size is
known when it is issued, its end is closed-form (start = max(now, link free), end = start + bytes /
bandwidth), which equals a SimPy `Resource(capacity=1)` queue without an event per transfer.
An SSD's reads and writes can be two links that share the device's bandwidth while both are busy
(`FairShareLink`), as measured on the lent GPU machine's disk (results/gpu).
"""
from __future__ import annotations

from collections import OrderedDict


class Link:
    __slots__ = ("name", "free_at", "busy_s", "bytes_moved")

    def __init__(self, name: str):
        self.name = name
        self.free_at = 0.0
        self.busy_s = 0.0
        self.bytes_moved = 0.0

    def transfer(self, now: float, nbytes: float, bw_bytes_per_s: float) -> float:
        """Queue a transfer; return when it ends."""
        start = now if now > self.free_at else self.free_at
        dur = nbytes / bw_bytes_per_s
        self.free_at = start + dur
        self.busy_s += dur
        self.bytes_moved += nbytes
        return self.free_at


class FairShareLink(Link):
    """One direction of a device whose bandwidth its two directions share while both are busy.

    Each direction is still FIFO; a transfer that starts while the other direction has `backlog`
    seconds of work left runs at half speed for as long as that work lasts (processor sharing of the
    device, work-conserving): it ends `min(own, backlog)` later than alone, and so does the other
    direction's backlog. Measured on the lent GPU machine's disk (`gpu.bench.ssd_read_under_write`):
    a read issued behind a long write took 2.3x its time alone, the write 1.3x; sharing predicts
    2.0x and 1.35x, a first-come-first-served queue 3.8x and 1.0x.
    """
    __slots__ = ("peer",)

    def __init__(self, name: str):
        super().__init__(name)
        self.peer = None

    def transfer(self, now: float, nbytes: float, bw_bytes_per_s: float) -> float:
        start = now if now > self.free_at else self.free_at
        own = nbytes / bw_bytes_per_s
        backlog = self.peer.free_at - start
        shared = 0.0 if backlog <= 0.0 else (own if own < backlog else backlog)
        self.peer.free_at += shared
        self.free_at = start + own + shared
        self.busy_s += own
        self.bytes_moved += nbytes
        return self.free_at

    @staticmethod
    def pair(a: str, b: str) -> tuple["FairShareLink", "FairShareLink"]:
        x, y = FairShareLink(a), FairShareLink(b)
        x.peer, y.peer = y, x
        return x, y


class Entry:
    """KV of one session's history (key = session id) or of one 512-token prefix block (key = hash)."""
    __slots__ = ("key", "tokens", "nbytes", "tier", "ready_at", "users")

    def __init__(self, key, tokens: int, nbytes: float, tier: "Tier", ready_at: float):
        self.key = key
        self.tokens = tokens
        self.nbytes = nbytes
        self.tier = tier
        self.ready_at = ready_at  # a prefetch or write-back into this tier ends then
        self.users = 0  # running jobs reading or appending to it: never evicted while > 0


class Tier:
    """A capacity-bounded store. `entries` is kept in recency order (LRU) or insertion order (FIFO)."""
    __slots__ = ("name", "capacity", "used", "reserved", "entries", "peak", "recency")

    def __init__(self, name: str, capacity_bytes: float, recency: bool):
        self.name = name
        self.capacity = capacity_bytes
        self.used = 0.0  # bytes of cached entries
        self.reserved = 0.0  # bytes held by running jobs (HBM only)
        self.entries: OrderedDict = OrderedDict()
        self.peak = 0.0
        self.recency = recency  # LRU order: a hit moves the entry to the back

    @property
    def free(self) -> float:
        return self.capacity - self.used - self.reserved

    def add(self, e: Entry) -> None:
        e.tier = self
        self.entries[e.key] = e
        self.used += e.nbytes
        self._peak()

    def remove(self, e: Entry) -> None:
        del self.entries[e.key]
        self.used -= e.nbytes
        e.tier = None

    def grow(self, e: Entry, tokens: int, nbytes: float) -> None:
        self.used += nbytes - e.nbytes
        e.tokens, e.nbytes = tokens, nbytes
        self._peak()

    def touch(self, e: Entry) -> None:
        if self.recency:
            self.entries.move_to_end(e.key)

    def _peak(self) -> None:
        occ = self.used + self.reserved
        if occ > self.peak:
            self.peak = occ
