"""Who runs next: the replica's queue, admission and the look-ahead window.

A scheduler takes jobs (`enqueue`), hands the engine the next prefill batch given the room left in
the running batch and what the KV store can hold (`next_batch`), and tells the store which keys the
jobs of its look-ahead window will read (`lookahead_keys`, CachedAttention §3.4: scheduler-aware
fetching and eviction). It never imports the store: it is handed one and calls `lookup`, `admit`
and `prefetch` on it.

`PrefillFirstScheduler` is the engine CachedAttention was built on (and Orca/early vLLM): FCFS, a
prefill iteration admits whole turns up to a token budget and pauses decoding, and each admitted
job holds HBM for its whole context plus its reply from admission to its end.
"""
from __future__ import annotations

from collections import deque
from itertools import islice

from sim.trace import BLOCK_TOKENS


class Job:
    """One turn being served: its history, what it reuses, what it computes and holds in HBM."""
    __slots__ = ("i", "sid", "arrival", "keys", "hist", "prompt", "output", "ctx_in", "hit", "hit_entries",
                 "computed", "res_bytes", "done_iter", "ctx", "save_end", "truncated", "saved_prompt_bytes",
                 "admitted", "blocks", "clipped")

    def __init__(self, i, sid, arrival, keys, hist, prompt, output, truncated, blocks=False):
        self.i, self.sid, self.arrival, self.keys = i, sid, arrival, keys
        self.blocks = blocks  # reuse by shared prefix blocks (Mooncake) rather than by session
        self.hist, self.prompt, self.output, self.truncated = hist, prompt, output, truncated
        self.ctx_in = hist + prompt
        self.hit = 0
        self.hit_entries = ()
        self.saved_prompt_bytes = 0.0
        self.save_end = 0.0
        self.admitted = False
        self.clipped = 0  # prompt and reply tokens cut so that the turn fits the context window


def reusable_block_keys(hashes, input_tokens: int) -> list:
    """Prefix blocks a request could reuse: whole blocks, leaving at least one token to compute."""
    n = min(len(hashes), max(input_tokens - 1, 0) // BLOCK_TOKENS)
    return hashes[:n]


class PrefillFirstScheduler:
    def __init__(self, cfg, shape, workload, store):
        sch, pol = cfg.scheduler, cfg.policy
        self.max_batch = sch.max_batch
        self.max_prefill_tokens = sch.max_prefill_tokens
        self.window_jobs = sch.lookahead_jobs  # jobs at the queue's head seen by fetch and eviction
        self.store = store
        self.context_window = shape.max_context_tokens
        self.kv_tok = shape.kv_bytes_per_token
        # scheduler-aware fetching stages SSD-resident KV of queued jobs into DRAM (§3.4)
        self.prefetch = pol.scheduler_aware_fetch and pol.kind == "attentionstore"
        ra = pol.round_attention
        # Round Attention: layers above the watershed load and hold only the kept rounds' history
        self.ra_factor = ((ra.watershed_layer + (shape.layers - ra.watershed_layer) * ra.kept_fraction)
                          / shape.layers if ra.enabled else 1.0)
        self.queue = deque()
        self.entered_window = []  # arrivals inside the look-ahead window, fetched after admission
        self.queue_version = 0  # bumped on every enqueue/dequeue: keys the cached look-ahead map
        self._lookahead, self._lookahead_version = None, -1
        self.session_context = {}  # session -> context tokens after its last turn (post truncation)
        # plain lists: numpy scalars read one at a time are slow and would leak into the clock
        self.w_session = list(workload.session)
        self.w_prompt = workload.prompt_tokens.tolist()
        self.w_output = workload.output_tokens.tolist()
        self.w_hashes = workload.prefix_hashes

    # ---- a turn becomes a job: truncation and reuse keys ----------------------------------
    def make_job(self, i, t) -> Job:
        sid = self.w_session[i]
        prompt = self.w_prompt[i]
        output = self.w_output[i]
        hashes = self.w_hashes[i]
        window = self.context_window
        # a turn longer than the window keeps its reply (up to window - 1 tokens) and as much of its prompt
        # as fits; the cut is counted (clipped_tokens) and the turn marked truncated, never silent
        asked = prompt + output
        output = min(output, window - 1)
        prompt = min(prompt, window - output)
        if hashes is not None:
            # Mooncake-style request: reuse is of the input's own leading blocks, from any request
            job = Job(i, sid, t, reusable_block_keys(hashes, prompt), 0, prompt, output, asked > window, blocks=True)
        else:
            hist = self.session_context.get(sid, 0)
            kept = min(hist, window - prompt - output)
            # history overflowing the window: drop the oldest tokens (CachedAttention §3.5);
            # a history truncated to nothing has nothing to reuse
            job = Job(i, sid, t, (sid,) if kept else (), kept, prompt, output, kept < hist)
        job.clipped = asked - prompt - output
        return job

    def enqueue(self, job: Job) -> None:
        self.queue.append(job)
        self.queue_version += 1
        if self.prefetch and len(self.queue) <= self.window_jobs:
            self.entered_window.append(job)

    def finished(self, job: Job, ctx: int) -> None:
        if not job.blocks:
            self.session_context[job.sid] = ctx

    def lookahead_keys(self) -> dict:
        """Keys the look-ahead window will read -> queue position; rebuilt only when the queue changed."""
        if self._lookahead_version != self.queue_version:
            keys = {}
            for pos, job in enumerate(islice(self.queue, self.window_jobs)):
                for key in job.keys:
                    keys.setdefault(key, pos)
            self._lookahead, self._lookahead_version = keys, self.queue_version
        return self._lookahead

    # ---- admission: FCFS, bounded by batch size, prefill tokens and HBM ----------------------
    def plan(self, job: Job) -> None:
        """What `job` reuses, computes, and must hold in HBM: its whole context and reply, less what
        already sits in HBM (reserved up front, so a running job never runs out)."""
        hit, entries = self.store.lookup(job)
        job.hit, job.hit_entries = hit, entries
        job.computed = job.ctx_in - hit
        in_hbm = 0.0
        hbm = self.store.hbm
        for e in entries:
            if e.tier is hbm:
                in_hbm += e.nbytes
        full = (job.ctx_in + job.output) * self.kv_tok
        if self.ra_factor != 1.0 and hit:
            full -= hit * self.kv_tok * (1.0 - self.ra_factor)
        job.res_bytes = full - in_hbm

    def next_batch(self, now, running: int) -> list:
        """The jobs of the next prefill iteration (possibly none), in FCFS order: stop at the first that
        does not fit the batch, the prefill token budget or HBM. Then stage the KV of jobs that entered
        the look-ahead window and still wait."""
        q = self.queue
        batch = []
        if q:
            store = self.store
            room = self.max_batch - running
            tokens = 0
            last = self.window_jobs - 1  # the look-ahead window's last position
            while q and room > 0:
                job = q[0]
                self.plan(job)
                if batch and tokens + job.computed > self.max_prefill_tokens:
                    break
                if not store.admit(job, now):
                    break
                q.popleft()
                self.queue_version += 1
                job.admitted = True
                batch.append(job)
                tokens += job.computed
                room -= 1
                if self.prefetch and len(q) > last >= 0:
                    store.prefetch(q[last], now)
        if self.entered_window:
            # fetch only for jobs that really wait: one admitted now loads layer-wise from SSD
            for job in self.entered_window:
                if not job.admitted:
                    self.store.prefetch(job, job.arrival)
            self.entered_window.clear()
        return batch

    def head_need_bytes(self) -> float:
        """HBM the job at the head of the queue needs (for the error when it can never fit)."""
        self.plan(self.queue[0])
        return self.queue[0].res_bytes
