"""The run pool (`sim.blocks.RunPool`: runs of blocks, the simulator's) makes the same decisions as the
exact pool (`ExactPool`: vLLM's `BlockPool`, block by block) on random multi-turn streams built to hit
every case the run pool's reasoning covers: shared system prompts computed twice at once (a key held
by two blocks), Mooncake-style shared hash chains cut inside a hash, sessions whose next turn extends
the last, truncation, preemption in a pool too small, and pure-decode stretches applied at once.
At every step both schedulers' plans and their pools' free queues, key by key, are compared."""
import random

import pytest

from sim.blocks import RunPool
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest


def _plan(p):
    return ([(x.req.id, x.num_new_tokens, x.is_decode) for x in p.scheduled], [r.id for r in p.preempted],
            {r.id: h for r, h in p.admitted.items()}, {r.id: e for r, e in p.external.items()}, p.free_blocks)


def _state(s):
    s.settle()
    pool = s.pool
    return ([(r.id, r.num_computed_tokens, r.num_output_tokens, r.num_blocks, r.num_cached_blocks,
              pool.request_keys(r), pool.request_refs(r)) for r in s.running],
            [r.id for r in s.waiting], pool.num_free, pool.queue_keys(), s.stats.preemptions)


class Stream:
    """Random requests, the same for both schedulers (each gets its own SeqRequest objects)."""

    def __init__(self, rng, bt):
        self.rng, self.bt = rng, bt
        self.sessions = {}  # session -> (context tokens, epoch)
        self.nsys = rng.choice([0, 1, 3])
        self.per = rng.choice([1, 2, 4])  # blocks per Mooncake hash
        self.hashes = list(range(rng.choice([3, 8, 30])))

    def session_turn(self, rid, sid):
        rng = self.rng
        ctx, ep = self.sessions.get(sid, (0, 0))
        if ctx and rng.random() < 0.15:  # truncated: every block holds other tokens now
            ep, ctx = ep + 1, ctx // 2
        prompt = ctx + rng.randrange(1, 200)
        out = rng.randrange(1, 120)
        self.sessions[sid] = (prompt + out, ep)
        nsys = self.nsys if ep == 0 else 0
        segs = [(0, "system", 0), (nsys, (sid, ep), nsys)] if nsys else [(0, (sid, ep), 0)]
        return (rid, prompt, out, segs)

    def hashed_turn(self, rid):
        rng = self.rng
        prompt = rng.randrange(1, 400)
        n = min(prompt // self.bt, rng.randrange(0, 12) * self.per + rng.randrange(0, self.per + 1))
        shared = rng.randrange(0, 4)
        segs, j = [], 0
        # chained hashes never repeat inside a request; random ones after the shared lead
        rest = rng.sample(self.hashes[shared:], len(self.hashes) - shared)
        while j * self.per < n and j < len(self.hashes):
            h = self.hashes[j] if j < shared else rest[j - shared]
            segs.append((j * self.per, ("h", h), 0))
            j += 1
        segs.append((n, ("turn", rid), n))
        return (rid, prompt, rng.randrange(1, 100), segs)


def _drive(seed, steps=2500):
    rng = random.Random(seed)
    bt = rng.choice([1, 4, 16])
    cfg = dict(num_blocks=rng.choice([12, 40, 150, 600]), max_num_batched_tokens=rng.choice([16, 64, 512]),
               max_num_seqs=rng.choice([2, 6, 64]), block_tokens=bt, max_model_len=rng.choice([None, 700]),
               long_prefill_token_threshold=rng.choice([0, 0, 48]))
    scheds = [ChunkedScheduler(ChunkedConfig(**cfg, pool=p)) for p in ("runs", "exact")]
    stream = Stream(rng, bt)
    rid = 0
    due = {}  # step -> request specs
    for t in range(0, steps // 3, 7):
        for _ in range(rng.randrange(0, 3)):
            rid += 1
            spec = stream.session_turn(rid, rng.randrange(5)) if rng.random() < 0.6 else stream.hashed_turn(rid)
            due.setdefault(t + rng.randrange(7), []).append(spec)
    t = 0
    decoded_at_once = 0
    while t < steps:
        for spec in due.pop(t, ()):
            for s in scheds:
                s.add_request(SeqRequest(spec[0], spec[1], spec[2], segments=spec[3]))
        if not any(s.has_unfinished() for s in scheds):
            t += 1
            continue
        k = scheds[0].decode_run_limit(rng.randrange(1, 40))
        assert scheds[1].decode_run_limit(40) >= k or k == 0
        if k and rng.random() < 0.5:
            done = [[r.id for r in s.apply_decodes(k)] for s in scheds]
            decoded_at_once += k
            t += k
        else:
            plans = [s.schedule() for s in scheds]
            assert _plan(plans[0]) == _plan(plans[1]), t
            done = [[r.id for r in s.update(p)] for s, p in zip(scheds, plans)]
            t += 1
        assert done[0] == done[1], t
        assert _state(scheds[0]) == _state(scheds[1]), t
        if rng.random() < 0.02:
            rid += 1
            spec = stream.session_turn(rid, rng.randrange(5))
            due.setdefault(t + rng.randrange(1, 5), []).append(spec)
    return scheds[0], decoded_at_once


@pytest.mark.parametrize("seed", range(40))
def test_run_pool_decides_as_the_exact_pool_at_every_step(seed):
    _drive(seed)  # asserts equal plans and pools at every step


def test_the_random_streams_reach_every_case():
    """The comparison above is only as good as its streams: over the seeds they preempt, hit keys held
    twice, split runs and evict from the free queue."""
    splits = pops = 0
    orig_split, orig_pop = RunPool._split, RunPool._pop

    def split(self, r, q):
        nonlocal splits
        splits += 1
        return orig_split(self, r, q)

    def pop(self, n):
        nonlocal pops
        if n > self.keyless:
            pops += 1
        return orig_pop(self, n)

    RunPool._split, RunPool._pop = split, pop
    try:
        preempted = dup = at_once = 0
        for seed in range(40):
            s, k = _drive(seed)
            preempted += s.stats.preemptions
            at_once += k
            dup += sum(1 for runs in s.pool.cached.values() for i, r in enumerate(runs)
                       for e in runs[:i] if e.lo < r.lo + r.n and r.lo < e.lo + e.n)
    finally:
        RunPool._split, RunPool._pop = orig_split, orig_pop
    assert preempted > 20 and splits > 20 and pops > 20 and at_once > 100
    assert dup > 0, "no key was ever held by two runs at once"


def test_a_hit_inside_a_free_run_takes_its_front_and_leaves_its_back_queued():
    # blocks of 1 token: a request caches (c, 0..5), finishes; a second one hits (c, 0..2) only
    pool = RunPool(10)
    a = SeqRequest(1, 6, 1, segments=[(0, "c", 0)])
    pool.allocate(a, 6)
    pool.cache(a, 6)
    pool.free(a)
    assert pool.num_free == 10 and pool.queue_keys() == [None] * 4 + [("c", p) for p in (5, 4, 3, 2, 1, 0)]
    b = SeqRequest(2, 3, 1, segments=[(0, "c", 0), (3, "d", 0)])
    hit, blocks, free = pool.lookup(b, 5)
    assert (blocks, free) == (3, 3)
    pool.touch(b, hit)
    assert pool.num_free == 7 and pool.queue_keys() == [None] * 4 + [("c", 5), ("c", 4), ("c", 3)]
    # 5 more blocks: the 4 keyless ones, then the deepest cached one is evicted
    pool.allocate(b, 5)
    assert pool.queue_keys() == [("c", 4), ("c", 3)] and pool.lookup(SeqRequest(3, 9, 1, segments=[(0, "c", 0)]), 8)[1] == 5


def test_the_exact_pools_count_of_keyless_free_blocks_follows_every_move():
    """The count `BlockPool.keyless_free` keeps as blocks are allocated, touched by prefix hits, cached
    and freed (preemptions included) equals a count over the free queue at every step."""
    import random
    from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest
    rnd = random.Random(5)
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=24, max_num_batched_tokens=48, block_tokens=4))
    pool = sched.pool.pool
    steps = 0
    for k in range(30):
        session = rnd.randrange(6)   # turns of one session share their first blocks' keys
        sched.add_request(SeqRequest(k, rnd.randrange(5, 40), rnd.randrange(1, 30),
                                     lambda i, s=session: (s, i)))
        for _ in range(rnd.randrange(1, 6)):
            if not sched.has_unfinished():
                break
            plan = sched.schedule()
            sched.update(plan)
            steps += 1
            assert pool.keyless_free == sum(1 for b in pool.free if pool.key[b] is None)
    assert steps > 50 and sched.stats.preemptions > 0
