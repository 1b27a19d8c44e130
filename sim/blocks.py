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
    __slots__ = ("num_blocks", "ref", "key", "free", "cached")

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
        ref, free = self.ref, self.free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop `n` blocks from the head of the free queue, evicting their cached keys."""
        if n > len(self.free):
            raise ValueError(f"cannot allocate {n} blocks: {len(self.free)} free")
        free, ref, key, cached = self.free, self.ref, self.key, self.cached
        pop = free.popitem
        out = []
        for _ in range(n):
            b = pop(False)[0]
            k = key[b]
            if k is not None:  # evict its key (`_uncache`, inlined: the simulator's hottest loop)
                ids = cached[k]
                del ids[b]
                if not ids:
                    del cached[k]
                key[b] = None
            ref[b] = 1
            out.append(b)
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
