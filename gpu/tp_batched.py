"""The batched executor under tensor parallelism (issue 16, item 5): one process per GPU, every rank running
the same serving loop and the same scheduler over its shard of the model.

What is sharded (`gpu.batched.random_model(rank=, tp=)`, Megatron's split as `gpu.tp_layer`): each rank holds
its query heads, its KV heads (one replicated head where there are fewer KV heads than ranks) and its MLP
columns of every layer, and a paged KV pool of its own KV heads (`BatchedExecutor` sizes the pool from the
shard's shape); the embedding and LM head are whole on every rank, so every rank computes every logit (as
`gpu.tp_executor`). The attention output and MLP down projections end in partial sums that an all-reduce
over the TP group completes (`BatchedModel.reduce`, NCCL inside the static-shape CUDA graphs on the GPU, gloo
on CPU).

Why the ranks stay in step without exchanging plans: `sim.scheduler.ChunkedScheduler` and
`gpu.batched.serve_sessions` are deterministic given what they are told, and the only input that differs
between processes is the clock. So every rank's loop reads rank 0's clock (`ShmSync.clock`: rank 0 reads
its own and publishes each reading, the others take it), admits the same arrivals, builds the same plans
and pads them to the same static shapes (so their graphs hold the same all-reduces in the same order); the
sampled tokens agree because the logits are computed from the all-reduced hidden state on every rank.
What would break that (a rank's own decision, a nondeterministic path) must fail loudly rather than hang
in a collective of another size or serve garbage: `TPBatchedExecutor` folds every plan (and the tokens it
sampled) into a running digest and compares it across ranks before the step's collectives
(`ShmSync.check`), raising `RankDivergence` on every rank where one differs.

Two ways for the ranks to agree (`SYNCS`): a shared-memory file (`ShmSync`, the ranks of one host spin
on slots rank 0 writes: 2-3 us a reading on the sandbox), or broadcasts over a gloo group (`GlooSync`:
~0.6 ms a call on the sandbox's loopback); `bench/gpu_tp_batched_validate.py` times both on the device.
"""
from __future__ import annotations

import os
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist

from gpu.batched import BatchedExecutor
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest, StepPlan

SYNCS = ("shm", "gloo")


class RankDivergence(RuntimeError):
    """Ranks planned different steps (or sampled different tokens): their collectives would not match."""


class RankTimeout(RuntimeError):
    """A rank waited longer than the sync's timeout for the others (one of them died or hangs)."""


# ---- what the ranks compare ---------------------------------------------------------------------------

def plan_digest(prev: int, plan: StepPlan, extra: int = 0) -> int:
    """`prev` extended by a plan, before it runs: per scheduled request its new tokens, decode flag, tokens
    with KV, known tokens, blocks and last block id (where its new K/V go), and the admitted, preempted and
    host-loaded counts and free blocks, and `extra` (what else decides the step's collectives). Equal plans
    give equal digests on every process (crc32: no per-process hash seed)."""
    vals = [len(plan.scheduled), len(plan.admitted), len(plan.preempted), sum(plan.external.values()),
            plan.free_blocks, extra]
    for r, n, dec in plan.scheduled:
        blocks = r.blocks     # the exact pool's ids (read, not copied: this runs before every step)
        vals += (n, int(dec), r.num_computed_tokens, r.num_tokens, len(blocks), blocks[-1] if blocks else -1)
    return zlib.crc32(np.asarray(vals, dtype=np.int64).tobytes(), prev)


def tokens_digest(prev: int, tokens) -> int:
    """`prev` extended by a step's sampled tokens, in plan order."""
    return zlib.crc32(np.asarray(list(tokens), dtype=np.int64).tobytes(), prev) if tokens else prev


# ---- agreement among the ranks ------------------------------------------------------------------------

class ShmSync:
    """Rank 0's clock and the digest check through one shared-memory file (the ranks of one host map it).

    Clock: rank 0 writes reading k into ring slot k % SLOTS and then its sequence number; a rank waits
    for that sequence number, takes the value and acknowledges it (rank 0 does not overwrite a slot that
    some rank has not read). Check k: every rank writes its digest into its own slot and then k, waits for
    every other rank's k, and compares. x86 keeps stores in order, so a sequence number seen means its
    value is there. A wait longer than `timeout_s` raises `RankTimeout` (a dead or hung rank).
    A plain file under /dev/shm mapped with numpy (not `multiprocessing.shared_memory`, whose resource
    tracker would unlink or complain about a segment that several processes attach)."""
    SLOTS = 256

    def __init__(self, path: str, rank: int, world: int, timeout_s: float = 300.0):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        S = self.SLOTS
        self.mem = a = np.memmap(path, dtype=np.int64, mode="r+", shape=(self.words(world),))
        self.clock_seq, self.ack = a[:S], a[2 * S:2 * S + world]
        self.clock_val = a[S:2 * S].view(np.float64)
        o = 2 * S + world
        self.check_seq = a[o:o + world * S].reshape(world, S)
        self.check_dig = a[o + world * S:o + 2 * world * S].reshape(world, S)
        self.k_clock = self.k_check = 0

    @classmethod
    def words(cls, world: int) -> int:
        return 2 * cls.SLOTS + world + 2 * world * cls.SLOTS

    @classmethod
    def create(cls, world: int) -> str:
        """The file, made by the launcher before the ranks start (it removes it when they are done), every
        sequence number -1 (nothing written). Returns its path."""
        import tempfile
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="kvsim_tp_sync_", dir=folder)
        os.close(fd)
        mem = np.memmap(path, dtype=np.int64, mode="w+", shape=(cls.words(world),))
        mem[:] = -1
        mem.flush()
        del mem
        return path

    def _wait(self, ready, what: str) -> None:
        t0 = time.perf_counter()
        spins = 0
        while not ready():
            spins += 1
            if spins > 200:
                os.sched_yield()     # ranks may share cores (the CPU smoke run)
                if spins % 4096 == 0 and time.perf_counter() - t0 > self.timeout_s:
                    raise RankTimeout(f"rank {self.rank}: waited {self.timeout_s:.0f} s for {what}")

    def clock(self) -> float:
        k, S = self.k_clock, self.SLOTS
        self.k_clock += 1
        i = k % S
        if self.rank == 0:
            if k >= S:   # slot i last held reading k - S: every rank must have taken it
                self._wait(lambda: int(self.ack[1:].min(initial=k)) >= k - S, f"the ranks to read clock {k - S}")
            t = time.perf_counter()
            self.clock_val[i] = t
            self.clock_seq[i] = k
            return t
        self._wait(lambda: int(self.clock_seq[i]) >= k, f"rank 0's clock reading {k}")
        if int(self.clock_seq[i]) != k:
            raise RankTimeout(f"rank {self.rank}: clock slot {i} holds reading {int(self.clock_seq[i])}, expected {k}")
        t = float(self.clock_val[i])
        self.ack[self.rank] = k
        return t

    def check(self, digest: int) -> None:
        k, S = self.k_check, self.SLOTS
        self.k_check += 1
        i = k % S
        self.check_dig[self.rank, i] = digest
        self.check_seq[self.rank, i] = k
        for q in range(self.world):
            if q == self.rank:
                continue
            # a rank can be one check ahead at most (it waits for everyone at each): slot i is check k's
            self._wait(lambda: int(self.check_seq[q, i]) >= k, f"rank {q}'s check {k}")
            if int(self.check_dig[q, i]) != digest:
                raise RankDivergence(f"check {k}: rank {q}'s digest {int(self.check_dig[q, i]):#x} differs from rank "
                                     f"{self.rank}'s {digest:#x}: the ranks no longer plan the same steps")

    def close(self) -> None:
        self.clock_seq = self.clock_val = self.ack = self.check_seq = self.check_dig = self.mem = None


class GlooSync:
    """The same agreement over a gloo group: a broadcast of rank 0's reading per clock call, an all-gather
    of the digests per check."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.k_check = 0

    def clock(self) -> float:
        t = torch.tensor([time.perf_counter() if self.rank == 0 else 0.0], dtype=torch.float64)
        dist.broadcast(t, src=0, group=self.group)
        return float(t[0])

    def check(self, digest: int) -> None:
        k = self.k_check
        self.k_check += 1
        # crc32 digests fit an int64
        got = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(got, torch.tensor([digest], dtype=torch.int64), group=self.group)
        for q, g in enumerate(got):
            if int(g) != digest:
                raise RankDivergence(f"check {k}: rank {q}'s digest {int(g):#x} differs from rank {self.rank}'s "
                                     f"{digest:#x}: the ranks no longer plan the same steps")

    def close(self) -> None:
        pass


def sync_cost_us(sync, calls: int = 500) -> dict:
    """Microseconds a serving step pays to agree, on this rank: one clock call and one check (a step makes
    four clock calls and one check; `bench/gpu_tp_batched_validate.py` times both syncs on the device).
    Every rank runs it at once; the checks align them."""
    sync.check(0)
    t0 = time.perf_counter()
    for _ in range(calls):
        sync.clock()
    t1 = time.perf_counter()
    for _ in range(calls):
        sync.check(0)
    t2 = time.perf_counter()
    return {"clock_us": (t1 - t0) / calls * 1e6, "check_us": (t2 - t1) / calls * 1e6}


# ---- the executor -------------------------------------------------------------------------------------

class TPBatchedExecutor(BatchedExecutor):
    """`BatchedExecutor` over one rank's shard (`model.reduce` set), checking before each step's collectives
    that every rank runs the same plan (`sync.check` every `check_every` steps, on the digest of every plan
    and sampled token so far: a divergence between checks is still found at the next one)."""

    def __init__(self, model, num_blocks: int, block_tokens: int, sync, check_every: int = 1, **kw):
        if model.reduce is None:
            raise ValueError("a TP executor's model needs its all-reduce (BatchedModel.reduce)")
        super().__init__(model, num_blocks, block_tokens, **kw)
        self.sync, self.check_every = sync, check_every
        self.digest = 0
        self.steps = 0

    def run(self, plan: StepPlan, keep_logits: bool = False):
        if plan.scheduled:
            # a rank whose graphs failed to capture runs eagerly, at other shapes: its all-reduces would differ
            st = self.static
            flags = 0 if st is None else int(st.failed is not None) | int(st.chunk_failed is not None) << 1
            self.digest = plan_digest(self.digest, plan, flags)
            if self.steps % self.check_every == 0:
                self.sync.check(self.digest)
            self.steps += 1
        out = super().run(plan, keep_logits)
        self.digest = tokens_digest(self.digest, out.sampled.values())
        return out


def all_reduce_sum(t: torch.Tensor) -> None:
    """The TP all-reduce of the default process group (the world is the TP group), in place."""
    dist.all_reduce(t)


# ---- a fixed script of steps (the TP check on CPU and on the device) ------------------------------------

def scripted_logits(ex: BatchedExecutor, budget: int = 10, scale: int = 1):
    """Three requests (prompts 13, 7, 22 tokens x `scale`) chunked under a `budget`-token step, prefill chunks
    riding with decodes, then one whose prompt extends request 0's tokens (its reply included) under the
    same block keys: a prefix-cache hit. Prompt ids are seeded, so every executor (sharded or not) sees the
    same tokens. Returns every step's logits concatenated, each step's [(new, cached tokens)] and the last
    request's prefix-cache hit."""
    bt = ex.bt
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=ex.k.shape[1] - 1, max_num_batched_tokens=budget,
                                           block_tokens=bt, prefix_caching=True))
    vocab = ex.shape.vocab

    def ids(seed, n):
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, shapes, hits = [], [], {}

    def step_all():
        while sched.has_unfinished():
            plan = sched.schedule()
            hits.update({r.id: h for r, h in plan.admitted.items()})
            shapes.append([(n, r.num_computed_tokens) for r, n, _ in plan.scheduled])
            rows.append(ex.run(plan, keep_logits=True).logits)
            sched.update(plan)
    first = [SeqRequest(k, p * scale, o, lambda i, k=k: (k, i)) for k, (p, o) in enumerate([(13, 5), (7, 6), (22, 3)])]
    for k, r in enumerate(first):
        ex.add(r, ids(10 + k, r.prompt_tokens))
        sched.add_request(r)
    step_all()
    toks = ex.forget(first[0])
    again = SeqRequest("again", len(toks) + 5 * scale, 3, lambda i: (0, i))
    ex.add(again, toks + ids(40, 5 * scale))
    sched.add_request(again)
    step_all()
    return torch.cat(rows), shapes, hits["again"]
