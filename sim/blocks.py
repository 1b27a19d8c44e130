"""Paged KV in HBM: fixed-size blocks, reference counts, a prefix cache and vLLM's free queue.

`BlockPool` follows vLLM V1's `BlockPool` and `FreeKVCacheBlockQueue` (vllm/v1/core/block_pool.py,
kv_cache_utils.py, 0.32.0) so that a scheduler built on it makes vLLM's decisions block for block:

* Blocks are numbered 1..num_blocks (vLLM's block 0 is its null block, never handed out; the pool
  here is given the usable count). The free queue starts in id order.
* A block's identity in the prefix cache is its *key*: any hashable, equal for two blocks exactly
  when vLLM's chained block hashes are equal (a block holds the same tokens after the same prefix).
  Several blocks may hold one key (two requests computed the same block before either was cached);
  a lookup returns the first of them still cached, as vLLM's `BlockHashToBlockMap.get_one_block`.
* Allocation pops blocks from the head of the free queue; a popped block that still has a key is
  evicted from the cache then (`get_new_blocks`).
* Freeing takes a request's blocks in eviction order (the caller passes them tail first): blocks
  without a key (a partly filled last block, never matchable) go to the head of the queue, reused
  first; keyed blocks go to the tail, kept longest (`free_blocks`). So the cache is LRU by free
  time, and within one request the deepest block goes before its prefix.
* A hit (`touch`) takes a free cached block out of the queue; freed again, it goes to the tail.
* `num_free` counts the queue: never-used, cached-but-unreferenced and unkeyed free blocks.

The pool knows nothing of requests: the scheduler keeps each request's block list and how many of
its blocks are cached, and calls `cache_full_blocks` when blocks are scheduled to be filled.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence


class BlockPool:
    __slots__ = ("num_blocks", "ref", "key", "free", "cached", "keyless_free")

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # index 0 stands for vLLM's null block and is never used, so block ids match vLLM's
        self.ref = [0] * (num_blocks + 1)
        self.key: list[Hashable | None] = [None] * (num_blocks + 1)
        # the free queue: an OrderedDict of block id -> None gives O(1) pop at the head, append at
        # the tail, prepend (move_to_end(last=False)) and removal from the middle
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))
        # key -> {block id: None}, in insertion order: the first entry is the one a lookup returns
        self.cached: dict[Hashable, dict[int, None]] = {}
        # free blocks holding no key, counted as they move (HBM holds KV in every other block; a
        # count over the queue cost the executor's scheduler ~1 ms a step at 14k blocks, run 23)
        self.keyless_free = num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def lookup(self, block_key: Callable[[int], Hashable], max_blocks: int) -> list[int]:
        """The longest run of cached blocks from block 0, at most `max_blocks` (vLLM's
        `find_longest_cache_hit`: a missing block ends the run, later blocks cannot match)."""
        hit = []
        cached = self.cached
        for i in range(max_blocks):
            ids = cached.get(block_key(i))
            if not ids:
                break
            hit.append(next(iter(ids)))
        return hit

    def num_evictable(self, blocks: Iterable[int]) -> int:
        """Blocks among `blocks` that sit in the free queue: touching them takes them out of it,
        so an admission check counts them as blocks it needs."""
        ref = self.ref
        return sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        ref, free, key = self.ref, self.free, self.key
        for b in blocks:
            if ref[b] == 0:
                del free[b]
                if key[b] is None:
                    self.keyless_free -= 1
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop `n` blocks from the head of the free queue, evicting their cached keys."""
        if n > len(self.free):
            raise ValueError(f"cannot allocate {n} blocks: {len(self.free)} free")
        free, ref, key, cached = self.free, self.ref, self.key, self.cached
        pop = free.popitem
        out = []
        keyless = 0
        for _ in range(n):
            b = pop(False)[0]
            k = key[b]
            if k is not None:  # evict its key (`_uncache`, inlined: the simulator's hottest loop)
                ids = cached[k]
                del ids[b]
                if not ids:
                    del cached[k]
                key[b] = None
            else:
                keyless += 1
            ref[b] = 1
            out.append(b)
        self.keyless_free -= keyless
        return out

    def free_blocks(self, ordered: Iterable[int]) -> None:
        """Drop one reference to each block, `ordered` first-evicted first (a request's blocks
        tail first). Unreferenced unkeyed blocks go to the head of the queue in that order,
        keyed ones to the tail in that order."""
        ref, key, free = self.ref, self.key, self.free
        first = []
        for b in ordered:
            ref[b] -= 1
            if ref[b] == 0:
                if key[b] is None:
                    first.append(b)
                else:
                    free[b] = None
        self.keyless_free += len(first)
        for b in reversed(first):
            free[b] = None
            free.move_to_end(b, last=False)

    def cache_full_blocks(self, blocks: Sequence[int], num_cached: int, num_full: int,
                          block_key: Callable[[int], Hashable]) -> int:
        """Give blocks[num_cached:num_full] (now full, or scheduled to be) their keys; returns the
        request's new count of cached blocks (vLLM's `cache_full_blocks`)."""
        if num_full <= num_cached:
            return num_cached
        key, cached = self.key, self.cached
        for i in range(num_cached, num_full):
            b = blocks[i]
            k = block_key(i)
            if key[b] is None and self.ref[b] == 0:   # a free block gaining a key (callers hold theirs)
                self.keyless_free -= 1
            key[b] = k
            ids = cached.get(k)
            if ids is None:
                cached[k] = {b: None}
            else:
                ids[b] = None
        return num_full

    def _uncache(self, b: int, k: Hashable) -> None:
        ids = self.cached[k]
        del ids[b]
        if not ids:
            del self.cached[k]
        self.key[b] = None
        if self.ref[b] == 0 and b in self.free:
            self.keyless_free += 1


# ---- the pools as the scheduler uses them: per request ------------------------------------------
#
# A request (`sim.scheduler.SeqRequest`) carries `blocks` (the pool's record of its blocks in token
# order: block ids, or the run pool's keyed runs only), `num_blocks` and `num_cached_blocks`; the pools
# below keep them. Its block keys come as
# *segments*: `(first block, chain, position of that block)` in block order, the last one open-ended,
# so that block i of a segment has key `(chain, position + i - first block)` (a session's history is
# one chain, a shared system prompt another, each 512-token hash of a Mooncake trace another). A
# request with a plain `block_key(i)` is one segment per block: `(i, block_key(i), 0)`.

def key_of(segments, i: int):
    """The key of block i under `segments` (the exact pool's keys; the run pool never builds them)."""
    for j in range(len(segments) - 1, -1, -1):
        start, chain, pos = segments[j]
        if start <= i:
            return chain, pos + i - start
    raise IndexError(i)


def _segments(req, lo: int, hi: int):
    """(first block, end block, chain, position of first block) of the segments covering blocks [lo, hi)."""
    segs = req.segments
    if segs is None:  # a plain key function: a segment per block
        key = req.block_key
        return [(i, i + 1, key(i), 0) for i in range(lo, hi)]
    out = []
    n = len(segs)
    for j in range(n):
        start, chain, pos = segs[j]
        end = segs[j + 1][0] if j + 1 < n else hi
        if end <= lo:
            continue
        if start >= hi:
            break
        a = lo if lo > start else start
        b = hi if hi < end else end
        out.append((a, b, chain, pos + a - start))
    return out


class ExactPool:
    """`BlockPool` behind the per-request interface: block ids as vLLM hands them out, one block at
    a time. The reference `RunPool` is tested against, and what a real executor needs (block tables)."""

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.peak_held = 0  # as RunPool.peak_held

    @property
    def num_free(self) -> int:
        return len(self.pool.free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still holding a cached key (reusable KV)."""
        return self.num_free - self.pool.keyless_free

    @property
    def num_keyless_free(self) -> int:
        return self.pool.keyless_free

    @staticmethod
    def _key(req):
        if req.segments is None:
            return req.block_key
        segs = req.segments
        return lambda i: key_of(segs, i)

    def lookup(self, req, max_blocks: int):
        """(hit handle, hit blocks, of them blocks waiting in the free queue)."""
        hit = self.pool.lookup(self._key(req), max_blocks)
        return hit, len(hit), self.pool.num_evictable(hit)

    def touch(self, req, hit) -> None:
        self.pool.touch(hit)
        req.blocks = list(hit)
        req.num_blocks = req.num_cached_blocks = len(hit)

    def allocate(self, req, n: int) -> None:
        req.blocks.extend(self.pool.allocate(n))
        req.num_blocks += n
        self._note_peak()

    def admit(self, req, hit, blocks: int, num_full: int) -> None:
        """A waiting request's admission: take its hit (`touch`), allocate up to `blocks` blocks in all,
        and key the first `num_full` (`cache`; 0 with prefix caching off)."""
        self.touch(req, hit)
        if blocks > req.num_blocks:
            self.allocate(req, blocks - req.num_blocks)
        self.cache(req, num_full)

    def _note_peak(self) -> None:
        held = self.num_blocks - self.num_keyless_free
        if held > self.peak_held:
            self.peak_held = held

    def allocate_decodes(self, running, k: int, bt: int) -> None:
        """The blocks k pure decode steps allocate: step-major, in running order."""
        events = []
        for idx, r in enumerate(running):
            j = r.num_blocks * bt - r.num_computed_tokens + 1
            while j <= k:
                events.append((j, idx))
                j += bt
        if events:
            events.sort()
            for (_, idx), b in zip(events, self.pool.allocate(len(events))):
                running[idx].blocks.append(b)
                running[idx].num_blocks += 1
            self._note_peak()

    def cache(self, req, num_full: int) -> None:
        req.num_cached_blocks = self.pool.cache_full_blocks(req.blocks, req.num_cached_blocks, num_full,
                                                            self._key(req))

    def free(self, req) -> None:
        self.pool.free_blocks(reversed(req.blocks))
        req.blocks = []
        req.num_blocks = req.num_cached_blocks = 0

    def block_table(self, req) -> list[int]:
        return list(req.blocks)

    # what a test compares between the pools
    def queue_keys(self) -> list:
        key = self.pool.key
        return [key[b] for b in self.pool.free]

    def request_keys(self, req) -> list:
        key = self.pool.key
        return [key[b] for b in req.blocks]

    def request_refs(self, req) -> list[int]:
        return [self.pool.ref[b] for b in req.blocks]


class Run:
    """Blocks that behave as one: one chain's positions [lo, lo + n), keyed, with the same holders
    (the requests referencing them). A run with no holder sits in the free queue (prev/next). A
    request's unkeyed blocks are no run: its last num_blocks - num_cached_blocks blocks, a count."""
    __slots__ = ("chain", "lo", "n", "holders", "prev", "next")

    def __init__(self, chain, lo: int, n: int, holders):
        self.chain, self.lo, self.n, self.holders = chain, lo, n, holders
        self.prev = self.next = None

    def __repr__(self):
        return f"Run({self.chain!r}, {self.lo}..{self.lo + self.n}, holders={len(self.holders)})"


class RunPool:
    """vLLM's block pool kept as runs of blocks instead of blocks: the same decisions as `BlockPool`
    (free counts, prefix hits, which cached keys each allocation evicts) at a cost per run, not per
    16-token block. Block ids are not kept: no decision depends on them (`ExactPool` has them).

    Why runs suffice (vLLM's free queue, `BlockPool`'s docstring):
    * A free block without a key only ever enters the queue at its head and a keyed one at its tail,
      and a key is lost only when its block is popped: so the queue is all keyless blocks, then the
      keyed ones in the order they were freed. Keyless blocks are interchangeable: a count.
    * A request frees its blocks tail first, so a freed keyed run enters the queue deepest position
      first, and popping evicts it from its deep end: what stays cached is still [lo, lo + n').
    * A hit is a prefix of the request's chains; it takes the matching positions out of a run,
      splitting it where the hit ends (or begins, when another run holds the earlier positions).
    * Several runs may hold one key (two requests computed a block before either was cached): a
      lookup takes, position by position, the earliest-cached run holding it (`get_one_block`). Each
      chain lists its runs in caching order; a run grows at its end only while it is its chain's
      last, so a run's place in the list is every one of its positions' place.
    * A request's keyed blocks are always its first `num_cached_blocks` (keys are given in block
      order), so its `blocks` lists only its keyed runs; the keyless rest is a count,
      `num_blocks - num_cached_blocks` (allocating bumps it, keying moves blocks into runs).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.num_free = num_blocks
        self.keyless = num_blocks  # free blocks without a key: the head of the queue
        # most blocks holding KV at once (referenced or cached): they grow only when keyless ones are taken
        self.peak_held = 0
        self.cached: dict = {}  # chain -> [Run] in caching order
        q = self._q = Run(None, 0, 0, None)  # sentinel of the keyed free queue
        q.prev = q.next = q

    @property
    def num_cached_free(self) -> int:
        """Free blocks still holding a cached key (reusable KV)."""
        return self.num_free - self.keyless

    @property
    def num_keyless_free(self) -> int:
        """Free blocks holding nothing: HBM holds KV in the rest (referenced or cached)."""
        return self.keyless

    # ---- the queue of free keyed runs ---------------------------------------------------------
    def _append(self, r: Run) -> None:
        q = self._q
        last = q.prev
        r.prev, r.next = last, q
        last.next = q.prev = r

    @staticmethod
    def _unlink(r: Run) -> None:
        r.prev.next = r.next
        r.next.prev = r.prev
        r.prev = r.next = None

    def _uncache(self, r: Run) -> None:
        runs = self.cached[r.chain]
        runs.remove(r)
        if not runs:
            del self.cached[r.chain]

    def _split(self, r: Run, q: int) -> Run:
        """Cut keyed run r at position q: r keeps [lo, q); the returned run holds [q, hi), next to r
        in its chain's list and its holders' block lists, and before r in the free queue (popped
        first, being deeper)."""
        x = Run(r.chain, q, r.lo + r.n - q, list(r.holders))
        r.n = q - r.lo
        runs = self.cached[r.chain]
        runs.insert(runs.index(r) + 1, x)
        if r.holders:
            for h in r.holders:
                blocks = h.blocks
                blocks.insert(blocks.index(r) + 1, x)
        else:
            p = r.prev
            x.prev, x.next = p, r
            p.next = r.prev = x
        return x

    @staticmethod
    def _winner(runs, p: int):
        """The earliest-cached run holding position p, and where its lead ends (its end, or where an
        earlier-cached run begins). (None, p) when no run holds p."""
        for idx, r in enumerate(runs):
            lo = r.lo
            if lo <= p < lo + r.n:
                end = lo + r.n
                for e in runs[:idx]:
                    if p < e.lo < end:
                        end = e.lo
                return r, end
        return None, p

    # ---- the scheduler's interface --------------------------------------------------------------
    def lookup(self, req, max_blocks: int):
        """(hit handle, hit blocks, of them free ones): vLLM's `find_longest_cache_hit`. The handle,
        for `touch`, is the hit's count, or (run, first position, end position) when the hit lies in
        the one run of the request's first chain (found once here instead of again in `touch`)."""
        segs = req.segments
        if segs is not None and max_blocks > 0 and not segs[0][0] and (len(segs) == 1 or segs[1][0] >= max_blocks):
            # the common case: the blocks looked up lie in one chain (`_segments` of one segment, inline)
            p = segs[0][2]
            runs = self.cached.get(segs[0][1])
            if runs is None:
                return 0, 0, 0
            if len(runs) == 1:
                r = runs[0]
                pe = p + max_blocks
                if not r.lo <= p < r.lo + r.n:
                    return 0, 0, 0
                end = r.lo + r.n
                if end > pe:
                    end = pe
                hit = end - p
                return (r, p, end), hit, (0 if r.holders else hit)
        hit = free = 0
        cached = self.cached
        for a, b, chain, p in _segments(req, 0, max_blocks):
            runs = cached.get(chain)
            if runs is None:
                break
            pe = p + b - a
            if len(runs) == 1:  # the common case: one run holds this chain
                r = runs[0]
                if not r.lo <= p < r.lo + r.n:
                    break
                end = r.lo + r.n
                if end > pe:
                    end = pe
                hit += end - p
                if not r.holders:
                    free += end - p
                if end < pe:
                    break
                continue
            while p < pe:
                r, end = self._winner(runs, p)
                if r is None:
                    break
                if end > pe:
                    end = pe
                hit += end - p
                if not r.holders:
                    free += end - p
                p = end
            if p < pe:
                break
        return hit, hit, free

    def touch(self, req, hit: int) -> None:
        """Take the first `hit` blocks of the request's chains (as `lookup` found them)."""
        if type(hit) is tuple:  # one run holds the whole hit (`lookup`)
            r, p, end = hit
            req.num_blocks = req.num_cached_blocks = end - p
            req.blocks = [self._take(r, p, end, req)]
            return
        req.blocks = blocks = []
        req.num_blocks = req.num_cached_blocks = hit
        if not hit:
            return
        cached = self.cached
        for a, b, chain, p in _segments(req, 0, hit):
            runs = cached[chain]
            pe = p + b - a
            while p < pe:
                r, end = self._winner(runs, p)
                if end > pe:
                    end = pe
                blocks.append(self._take(r, p, end, req))
                p = end

    def _take(self, r: Run, p: int, end: int, req) -> Run:
        """Give `req` positions [p, end) of keyed run r: split off what lies outside, take the rest out of
        the free queue if no one held it, and add `req` to its holders."""
        if end < r.lo + r.n:
            self._split(r, end)
        if p > r.lo:
            r = self._split(r, p)
        if not r.holders:
            r.prev.next = r.next  # `_unlink(r)`, inline (once a hit)
            r.next.prev = r.prev
            r.prev = r.next = None
            self.num_free -= r.n
        r.holders.append(req)
        return r

    def _pop(self, n: int) -> None:
        free = self.num_free
        if n > free:
            raise ValueError(f"cannot allocate {n} blocks: {free} free")
        self.num_free = free - n
        k = self.keyless
        if k:
            if k >= n:
                self.keyless = k = k - n
                held = self.num_blocks - k
                if held > self.peak_held:
                    self.peak_held = held
                return
            # every keyless block is taken: HBM holds KV in all of them (with none left before, the peak
            # was reached when the last one went)
            if self.peak_held < self.num_blocks:
                self.peak_held = self.num_blocks
            self.keyless = 0
            n -= k
        q = self._q
        r = q.next
        if r.n > n:  # the common case: the oldest run loses its deepest positions
            r.n -= n
            return
        cached = self.cached
        while n:
            if r.n <= n:
                n -= r.n
                # `_unlink(r)` and `_uncache(r)`, inline: an admission evicts runs by the dozen
                nxt = r.next
                q.next = nxt
                nxt.prev = q
                r.prev = r.next = None
                runs = cached[r.chain]
                if len(runs) == 1:
                    del cached[r.chain]
                else:
                    runs.remove(r)
                r = nxt
            else:
                r.n -= n  # its deepest positions are evicted
                n = 0

    def allocate(self, req, n: int) -> None:
        self._pop(n)
        req.num_blocks += n  # its keyless tail grows (a count: `req.blocks` holds its keyed runs)

    def admit(self, req, hit, blocks: int, num_full: int) -> None:
        """A waiting request's admission: take its hit (`touch`), allocate up to `blocks` blocks in all,
        and key the first `num_full` (`cache`; 0 with prefix caching off). One call for the three on the
        scheduler's hot path, `touch` of a one-run hit inline."""
        if type(hit) is tuple:
            r, p, end = hit
            req.num_blocks = req.num_cached_blocks = end - p
            req.blocks = [self._take(r, p, end, req)]
        elif not hit:  # `touch` of no hit, inline (a turn's first admission, often)
            req.blocks = []
            req.num_blocks = req.num_cached_blocks = 0
        else:
            self.touch(req, hit)
        need = blocks - req.num_blocks
        if need > 0:
            self._pop(need)
            req.num_blocks = blocks
        if num_full > req.num_cached_blocks:
            self.cache(req, num_full)

    # n blocks for requests whose keyless tails the caller has grown itself (the scheduler's decode
    # stretch counts them in its own loop: `allocate_decodes` without the loop)
    allocate_counted = _pop

    def allocate_decodes(self, running, k: int, bt: int) -> None:
        # one pass: keyless blocks are interchangeable, so which request takes them first does not
        # matter here; the queue gives them all at once below (the caller checked they are free)
        total = 0
        for r in running:
            j = r.num_blocks * bt - r.num_computed_tokens + 1
            if j <= k:
                c = (k - j) // bt + 1
                total += c
                r.num_blocks += c
        if total:
            self._pop(total)

    def cache(self, req, num_full: int) -> None:
        """Blocks [num_cached, num_full) of the request, keyless until now, take their keys."""
        nc = req.num_cached_blocks
        if num_full <= nc:
            return
        blocks = req.blocks
        segs = req.segments
        if segs is not None and nc >= segs[-1][0]:
            # the common case: the blocks lie in the request's last chain (one piece of `_segments`, and the
            # loop below for it, inline): its newest run grows (a decode filling blocks), or a run begins
            start, chain, pos = segs[-1]
            p = pos + nc - start
            if blocks:
                last = blocks[-1]
                # a run it holds is cached: the chain's list holds it
                if (last.lo + last.n == p and len(last.holders) == 1 and last.chain == chain
                        and self.cached[chain][-1] is last):
                    last.n += num_full - nc
                    req.num_cached_blocks = num_full
                    return
            cached = self.cached
            runs = cached.get(chain)
            r = Run(chain, p, num_full - nc, [req])
            blocks.append(r)
            if runs is None:
                cached[chain] = [r]
            else:
                runs.append(r)
            req.num_cached_blocks = num_full
            return
        cached = self.cached
        for a, b, chain, p in _segments(req, nc, num_full):
            m = b - a
            last = blocks[-1] if blocks else None
            runs = cached.get(chain)
            if (last is not None and last.lo + last.n == p and len(last.holders) == 1
                    and runs is not None and runs[-1] is last and last.chain == chain):
                last.n += m  # the chain's newest run grows: its new positions are the newest cached
            else:
                r = Run(chain, p, m, [req])
                blocks.append(r)
                if runs is None:
                    cached[chain] = [r]
                else:
                    runs.append(r)
        req.num_cached_blocks = num_full

    def free(self, req) -> None:
        """Drop the request's blocks, tail first: keyless ones to the head, keyed runs to the tail."""
        n = req.num_blocks - req.num_cached_blocks  # its keyless tail
        self.keyless += n
        self.num_free += n
        q = self._q
        for r in reversed(req.blocks):
            h = r.holders
            h.remove(req)
            if not h:
                last = q.prev  # `_append(r)`, inline
                r.prev, r.next = last, q
                last.next = q.prev = r
                self.num_free += r.n
        req.blocks = []
        req.num_blocks = req.num_cached_blocks = 0

    # what a test compares between the pools
    def queue_keys(self) -> list:
        out = [None] * self.keyless
        q = self._q
        r = q.next
        while r is not q:
            out.extend((r.chain, p) for p in range(r.lo + r.n - 1, r.lo - 1, -1))
            r = r.next
        return out

    def request_keys(self, req) -> list:
        out = []
        for r in req.blocks:
            out.extend((r.chain, p) for p in range(r.lo, r.lo + r.n))
        return out + [None] * (req.num_blocks - req.num_cached_blocks)

    def request_refs(self, req) -> list[int]:
        out = []
        for r in req.blocks:
            out.extend([len(r.holders)] * r.n)
        return out + [1] * (req.num_blocks - req.num_cached_blocks)


POOLS = {"runs": RunPool, "exact": ExactPool}
