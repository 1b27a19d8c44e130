"""Where KV lives: capacity-bounded tiers (HBM, host DRAM, SSD) and the links that move it.

A link is a FIFO server with one transfer in flight at a time; since every transfer's size is
known when it is issued, its end is closed-form (start = max(now, link free), end = start + bytes /
bandwidth), which equals a SimPy `Resource(capacity=1)` queue without an event per transfer.
An SSD's reads and writes can be two links of one device whose requests interleave
(`SharedDeviceLink`), as measured on the lent GPU machine's disk (results/gpu).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from sim.costmodel import CONTENTION

# Where a turn's reused KV came from (the per-turn `hit_tier`): 'none' = nothing to reuse, 'miss' =
# there was a history but no tier held it. Stored as int8 codes in the recorder.
TIER_CODES = ("none", "miss", "hbm", "dram", "ssd")
NONE, MISS, HBM, DRAM, SSD = range(5)


class Link:
    __slots__ = ("name", "free_at", "bytes_moved")

    def __init__(self, name: str):
        self.name = name
        self.free_at = 0.0
        self.bytes_moved = 0.0

    def transfer(self, now: float, nbytes: float, bw_bytes_per_s: float, requests: int = 1) -> float:
        """Queue a transfer (of `requests` requests; only a shared device cares); return when it ends."""
        start = now if now > self.free_at else self.free_at
        dur = nbytes / bw_bytes_per_s
        self.free_at = start + dur
        self.bytes_moved += nbytes
        return self.free_at

    def charge(self, nbytes: float) -> None:
        """Count bytes moved synchronously (the GPU waits for them; no queue to join)."""
        self.bytes_moved += nbytes


class SharedDeviceLink(Link):
    """One direction of a device (an SSD) that serves both directions' requests, interleaved.

    Each direction is FIFO and moves a transfer as `requests` equal requests issued one after the
    other (the executor reads and writes a layer per request). While the other direction has work
    queued, each request also waits, on average, for half of the other side's request in service,
    and delays it by its own length: a transfer of n requests of q seconds, against a backlog of B
    seconds made of requests of p seconds, takes n (q + p/2) while the backlog lasts (it lasts 2B/p of
    our requests), and the backlog ends n q later. Work-conserving. Mode "even_split" takes p = 2q
    whatever the other side's requests: the two directions split the bandwidth evenly. Which mode a
    disk follows is measured (`gpu.bench.ssd_read_under_write`, reduced by
    `gpu.calibrate.ssd_contention_fit`); on the lent GPU machines' virtual
    disk "interleaved" was nearest (26% mean error over three request-size pairs; results/gpu).
    """
    __slots__ = ("peer", "pending", "even")

    def __init__(self, name: str, mode: str = "interleaved"):
        if mode not in CONTENTION or mode == "none":
            raise ValueError(f"shared device mode {mode!r}: expected one of {CONTENTION[1:]}")
        super().__init__(name)
        self.peer = None
        self.pending = deque()   # [end, request length] of this direction's transfers not yet done
        self.even = mode == "even_split"   # the other side's requests taken as twice ours

    def transfer(self, now: float, nbytes: float, bw_bytes_per_s: float, requests: int = 1) -> float:
        start = now if now > self.free_at else self.free_at
        own = nbytes / bw_bytes_per_s
        q = own / requests
        mine, theirs = self.pending, self.peer.pending
        while mine and mine[0][0] <= now:
            mine.popleft()
        while theirs and theirs[0][0] <= start:
            theirs.popleft()
        backlog = self.peer.free_at - start
        dur = own
        if backlog > 0.0 and theirs:
            p = 2.0 * q if self.even else theirs[0][1]   # the other side's request in service
            overlapping = 2.0 * backlog / p      # our requests that find the other side busy
            if requests <= overlapping:
                dur = requests * (q + 0.5 * p)
                delay = requests * q
            else:
                dur = own + backlog
                delay = overlapping * q
            for t in theirs:
                t[0] += delay
            self.peer.free_at += delay
        self.free_at = start + dur
        mine.append([self.free_at, q])
        self.bytes_moved += nbytes
        return self.free_at

    @staticmethod
    def pair(a: str, b: str, mode: str = "interleaved") -> tuple["SharedDeviceLink", "SharedDeviceLink"]:
        x, y = SharedDeviceLink(a, mode), SharedDeviceLink(b, mode)
        x.peer, y.peer = y, x
        return x, y


def ssd_links(contention: str) -> tuple[Link, Link]:
    """The SSD's (read, write) links: two directions of one device under `contention` (a mode of
    CONTENTION), or two independent FIFO links under "none"."""
    if contention != "none":
        return SharedDeviceLink.pair("ssd_read", "ssd_write", contention)
    return Link("ssd_read"), Link("ssd_write")


def ssd_read_stage(ssd_r: Link, cost, layers: int, ready: float, ssd_bytes: float) -> tuple:
    """A step's direct SSD reads (`ssd_bytes`, a request per layer) join the SSD's read queue no
    earlier than `ready`: (when they start, how much slower than alone they read). A device whose
    writes are in flight reads slower (SharedDeviceLink): the stage is stretched by that factor."""
    start = ssd_r.free_at if ssd_r.free_at > ready else ready
    bw = cost.ssd_read_bw(ssd_bytes / layers)
    slow = (ssd_r.transfer(start, ssd_bytes, bw, layers) - start) * bw / ssd_bytes
    return start, slow


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
