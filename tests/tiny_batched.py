"""What the batched-executor tests share: the tiny GQA model (float32 on CPU), prompt ids, and a scheduler
and executor over one exact block pool with requests added to both."""
import torch

from gpu.batched import BatchedExecutor, block_table, random_model, reference_logits
from gpu.tp_layer import TINY_GQA
from sim.scheduler import ChunkedConfig, ChunkedScheduler, SeqRequest

BT = 4


def tiny_model():
    return random_model(TINY_GQA, 512, "cpu", torch.float32, seed=3)


def ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_GQA.vocab, (n,), generator=g).tolist()


def scheduler_and_executor(model, num_blocks, budget, prefix_caching, requests, seed0, block_tokens=BT,
                           poison=True, **executor):
    """A scheduler and an executor (poisoned by default) over `num_blocks`; `requests` [(prompt, output), ...]
    become requests 0, 1, ... with their own keys and prompt ids from seeds seed0, seed0 + 1, ..."""
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=num_blocks, max_num_batched_tokens=budget,
                                           block_tokens=block_tokens, prefix_caching=prefix_caching))
    ex = BatchedExecutor(model, num_blocks=num_blocks, block_tokens=block_tokens, poison=poison, **executor)
    for k, (p, o) in enumerate(requests):
        r = SeqRequest(k, p, o, lambda i, k=k: (k, i))
        ex.add(r, ids(seed0 + k, p))
        sched.add_request(r)
    return sched, ex


def run_logits(sched, ex):
    """Step the scheduler to the end on the executor; every step's logits, concatenated."""
    rows = []
    while sched.has_unfinished():
        plan = sched.schedule()
        rows.append(ex.run(plan, keep_logits=True).logits)
        sched.update(plan)
    return torch.cat(rows)


class FakeClock:
    """A clock that advances only when the server sleeps or a step runs (1 ms a step)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.0005
        return self.t

    def sleep(self, dt):
        self.t += dt


def run_checked(ex, sched):
    """One scheduled step run by `ex`, every scheduled request's logits checked against a one-pass recompute:
    (plan, output, block tables before the step). The caller applies `sched.update(plan)`."""
    plan = sched.schedule()
    tables = {r: block_table(r) for r, _, _ in plan.scheduled}
    known = {r: list(ex.tokens[r]) for r, _, _ in plan.scheduled}
    out = ex.run(plan, keep_logits=True)
    for row, (r, n, _) in enumerate(plan.scheduled):
        last = r.num_computed_tokens + n - 1
        ref = reference_logits(ex.model, known[r][:last + 1])[last]
        got = out.logits[row]
        assert torch.isfinite(got).all(), f"{r.id}: NaN logits at position {last}"
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), f"{r.id}: logits differ at position {last}"
    return plan, out, tables
