"""Where each piece of reusable KV lives: the index, the HBM / DRAM / SSD tiers and the links between them.

Follows CachedAttention (arXiv 2403.19708): §3.1 KV of past turns saved to a host DRAM / SSD store
instead of dropped; §3.3 saving (the engine decides when: synchronously or overlapped with decode);
§3.4 scheduler-aware fetching (SSD -> DRAM for jobs inside the queue's look-ahead window) and
eviction (the policy objects of sim/eviction.py, handed the scheduler's look-ahead map on demand).
The HBM-only prefix cache it is compared with keeps finished KV in spare HBM (vLLM/SGLang-like).

The store never imports the scheduler: it is given a callable returning the look-ahead map
(key -> queue position), called only when something must be evicted.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Optional

from sim.eviction import Eviction
from sim.tiers import DRAM, HBM, MISS, NONE, SSD, Entry, Link, Tier, ssd_links, ssd_read_stage
from sim.trace import BLOCK_TOKENS


class KVStore:
    def __init__(self, kind: str, hbm_kv_bytes: float, dram_bytes: float, ssd_bytes: float, shape, cost,
                 eviction: Eviction, read_buffer_bytes: float, ssd_contention: str, decoupled_pe: bool,
                 lookahead: Callable[[], Optional[dict]]):
        self.policy = kind
        self.on_host = kind == "attentionstore"  # a host store (DRAM, SSD) behind HBM
        self.reuse = kind != "recompute"
        self.cost = cost
        self.L = shape.layers
        self.kv_tok = shape.kv_bytes_per_token
        # a session's KV is `shape.kv_bytes(tokens)`: bounded by the window on sliding-window layers
        self.kv_bytes = shape.kv_bytes_fn()
        self.sliding = bool(shape.sliding_layers)
        self.eviction = eviction
        self.decoupled = decoupled_pe  # KV saved without positions stays valid when truncated (§3.5)
        self.lookahead = lookahead if eviction.uses_lookahead else (lambda: None)
        recency = eviction.recency
        self.hbm = Tier("hbm", hbm_kv_bytes - read_buffer_bytes, recency)
        self.dram = Tier("dram", dram_bytes if self.on_host else 0.0, recency)
        self.ssd = Tier("ssd", ssd_bytes if self.on_host else 0.0, recency)
        self.index = {}  # key -> Entry (one tier per entry)
        self.h2d, self.d2h = Link("h2d"), Link("d2h")
        self.ssd_r, self.ssd_w = ssd_links(ssd_contention)
        self.releases = []  # heap (t, seq, bytes): HBM held by a write buffer until its write-back ends
        self.seq = 0
        self.evictions = {"hbm": 0, "dram": 0, "ssd": 0}

    # ---- what a job can reuse -------------------------------------------------------------
    def lookup(self, job) -> tuple:
        """(hit tokens, entries) of the reusable KV for `job`: a session's history is one entry; prefix
        blocks reuse the longest run of leading blocks present in any tier."""
        entries = []
        if not self.reuse or not job.keys:
            return 0, entries
        if not job.hashed:
            e = self.index.get(job.sid)
            if e is None:
                return 0, entries
            if job.truncated and not self.decoupled:
                # positions baked into the saved KV are now wrong: it must be recomputed
                self.drop(e)
                return 0, entries
            entries.append(e)
            return (job.hist if job.hist < e.tokens else e.tokens), entries  # min(), without its call
        index = self.index
        for key in job.keys:
            e = index.get(key)
            if e is None:
                break
            entries.append(e)
        return len(entries) * BLOCK_TOKENS, entries

    def admit(self, job, now) -> bool:
        """Hold `job.res_bytes` of HBM for a running job, evicting cached KV if needed; pin its hits."""
        hbm = self.hbm
        for e in job.hit_entries:  # pin before evicting so the hit survives
            e.users += 1
        if hbm.free < job.res_bytes and not self.make_room(hbm, job.res_bytes, now):
            for e in job.hit_entries:
                e.users -= 1
            return False
        hbm.reserved += job.res_bytes
        hbm._peak()
        for e in job.hit_entries:
            e.tier.touch(e)
        return True

    def hit_sources(self, job, ra_factor: float) -> tuple:
        """(hit tier code, bytes to load from DRAM, bytes to load from SSD, when the DRAM copy is ready)."""
        hbm, dram = self.hbm, self.dram
        dram_b = ssd_b = 0.0
        ready = 0.0
        code = MISS if job.keys else NONE
        for e in job.hit_entries:
            t = e.tier
            if t is hbm:
                if code < HBM:
                    code = HBM
                continue
            if job.hashed:
                b = e.nbytes
            elif self.sliding:  # sliding-window layers load only the last window of the hit
                b = self.kv_bytes(job.hit)
            else:
                b = e.nbytes * (job.hit / e.tokens)
            if ra_factor != 1.0:
                b *= ra_factor
            if t is dram:
                dram_b += b
                if code < DRAM:
                    code = DRAM
                if e.ready_at > ready:
                    ready = e.ready_at
            else:
                ssd_b += b
                code = SSD
        return code, dram_b, ssd_b, ready

    def read_ssd_stage(self, ready: float, ssd_bytes: float) -> tuple:
        """A prefill's direct SSD reads on the store's SSD (`sim.tiers.ssd_read_stage`)."""
        return ssd_read_stage(self.ssd_r, self.cost, self.L, ready, ssd_bytes)

    # ---- scheduler-aware fetching (§3.4) ------------------------------------------------------
    def prefetch(self, job, now) -> None:
        """Stage `job`'s SSD-resident KV into DRAM ahead of its turn, without pushing out KV that a job
        ahead of it in the queue will read."""
        prot = None
        for key in job.keys:
            e = self.index.get(key)
            if e is None:
                break
            if e.tier is self.ssd and not e.users:
                if prot is None:
                    prot = self.lookahead()
                pos = prot.get(key, math.inf) if prot is not None else -1
                # pinned: DRAM victims moving to SSD must not push out the very entry being fetched
                e.users += 1
                fits = self.make_room(self.dram, e.nbytes, now, pos, prot)
                e.users -= 1
                if not fits:
                    return
                end = self.ssd_r.transfer(now, e.nbytes, self.cost.ssd_read_bw(e.nbytes / self.L), self.L)
                self.ssd.remove(e)
                self.dram.add(e)
                e.ready_at = end

    def make_room(self, tier, nbytes, now, after_pos=math.inf, prot=None) -> bool:
        """Evict from `tier` until `nbytes` fit: DRAM victims move to SSD, SSD and HBM victims are dropped.

        By default the KV of queued jobs is never given up (a save spills to SSD instead);
        a prefetch passes its own queue position so only jobs behind it can lose theirs.
        """
        if tier.free >= nbytes:
            return True
        if nbytes > tier.capacity or not tier.entries:
            return False
        if prot is None:
            prot = self.lookahead()
        for e in self.eviction.victims(tier, nbytes, prot, after_pos):
            self.evictions[tier.name] += 1
            tier.remove(e)
            if tier is self.dram and self.ssd.capacity >= e.nbytes and self.make_room(self.ssd, e.nbytes, now):
                self.ssd_w.transfer(now, e.nbytes, self.cost.ssd_write_bw(e.nbytes / self.L), self.L)
                self.ssd.add(e)
            else:
                del self.index[e.key]
        return tier.free >= nbytes

    def drop(self, e) -> None:
        e.tier.remove(e)
        del self.index[e.key]

    # ---- HBM held by running jobs and write buffers ------------------------------------------
    def release(self, nbytes: float, at: float, now: float) -> None:
        """Free a job's HBM now, or when its write-back ends (the write buffer holds the KV until then)."""
        self.hbm.reserved -= nbytes
        if at > now:
            self.hbm.reserved += nbytes
            self.seq += 1
            heapq.heappush(self.releases, (at, self.seq, nbytes))

    def next_release_s(self) -> float:
        return self.releases[0][0] if self.releases else math.inf

    def take_releases(self, now) -> None:
        rel = self.releases
        while rel and rel[0][0] <= now:
            _, _, nbytes = heapq.heappop(rel)
            self.hbm.reserved -= nbytes

    # ---- saving (§3.3) and keeping in HBM ---------------------------------------------------
    def _put(self, key, tokens, nbytes, tier, now, ready_at) -> bool:
        """Put (or grow) an entry in `tier`; False if it cannot be made to fit."""
        e = self.index.get(key)
        if e is not None and e.tier is tier:
            delta = nbytes - e.nbytes
            e.users += 1  # do not evict the entry we are growing
            ok = delta <= 0 or self.make_room(tier, delta, now)
            e.users -= 1
            if not ok:
                self.drop(e)
                return False
            tier.grow(e, tokens, nbytes)
            tier.touch(e)
            e.ready_at = max(e.ready_at, ready_at)
            return True
        if e is not None:
            self.drop(e)
        if not self.make_room(tier, nbytes, now):
            return False
        e = Entry(key, tokens, nbytes, tier, ready_at)
        tier.add(e)
        self.index[key] = e
        return True

    def save_to_host(self, job, ctx, now, hashes) -> float:
        """Write the turn's new KV to DRAM (spilling to SSD if DRAM cannot hold it); return bytes written."""
        if job.hashed:  # prefix blocks of the input
            written = 0.0
            block_bytes = BLOCK_TOKENS * self.kv_tok
            for key in hashes[: job.prompt // BLOCK_TOKENS]:
                e = self.index.get(key)
                if e is not None:
                    e.tier.touch(e)
                    continue
                if self._put(key, BLOCK_TOKENS, block_bytes, self.dram, now, now):
                    written += block_bytes
                elif self._put(key, BLOCK_TOKENS, block_bytes, self.ssd, now, now):
                    # a block spilled to SSD is written through the SSD's write link like a history
                    self.ssd_w.transfer(now, block_bytes, self.cost.ssd_write_bw(block_bytes / self.L), self.L)
                    written += block_bytes
            return written
        e = self.index.get(job.sid)
        if self.sliding:
            nbytes = self.kv_bytes(ctx)
        else:  # `kv_bytes`, inline: once or twice per turn
            nbytes = self.kv_tok * ctx
        if e is not None and e.tier is self.dram and job.hit:
            # the reused part is already on the host (a sliding-window layer writes at most its window)
            new = self.kv_bytes(ctx - job.hit) if self.sliding else self.kv_tok * (ctx - job.hit)
            dram = self.dram
            if dram.capacity - dram.used - dram.reserved >= nbytes - e.nbytes:  # `Tier.free`
                # `dram.grow(e, ctx, nbytes)` and `dram.touch(e)`, inline (once per turn)
                used = dram.used = dram.used + (nbytes - e.nbytes)
                e.tokens, e.nbytes = ctx, nbytes
                occ = used + dram.reserved
                if occ > dram.peak:
                    dram.peak = occ
                if dram.recency:
                    dram.entries.move_to_end(e.key)
                if now > e.ready_at:
                    e.ready_at = now
                return new
        else:
            new = nbytes
        # a history already on SSD is appended to there: only the turn's new KV is written
        on_ssd = e is not None and e.tier is self.ssd and job.hit
        if self._put(job.sid, ctx, nbytes, self.dram, now, now):
            return new
        if self.ssd.capacity and self._put(job.sid, ctx, nbytes, self.ssd, now, now):
            written = self.kv_bytes(ctx - job.hit) if on_ssd else nbytes
            self.ssd_w.transfer(now, written, self.cost.ssd_write_bw(written / self.L), self.L)
            return written
        return 0.0

    def keep_in_hbm(self, job, ctx, now, hashes) -> None:
        """Prefix caching in spare HBM (vLLM/SGLang-like): the finished KV stays, LRU-evicted."""
        if job.hashed:
            block_bytes = BLOCK_TOKENS * self.kv_tok
            for key in hashes[: job.prompt // BLOCK_TOKENS]:
                e = self.index.get(key)
                if e is not None:
                    e.tier.touch(e)
                else:
                    self._put(key, BLOCK_TOKENS, block_bytes, self.hbm, now, now)
            return
        self._put(job.sid, ctx, self.kv_bytes(ctx), self.hbm, now, now)
