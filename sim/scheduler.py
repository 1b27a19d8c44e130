"""Who runs next: the replica's queue, admission and the look-ahead window.

A scheduler takes jobs (`enqueue`), hands the engine the next prefill batch given the room left in
the running batch and what the KV store can hold (`next_batch`), and tells the store which keys the
jobs of its look-ahead window will read (`lookahead_keys`, CachedAttention §3.4: scheduler-aware
fetching and eviction). It never imports the store: it is handed one and calls `lookup`, `admit`
and `prefetch` on it.

`PrefillFirstScheduler` is the engine CachedAttention was built on (and Orca/early vLLM): FCFS, a
prefill iteration admits whole turns up to a token budget and pauses decoding, and each admitted
job holds HBM for its whole context plus its reply from admission to its end.

`ChunkedScheduler` is vLLM V1's: one token budget per step shared by decodes and prefill chunks,
paged KV allocated as tokens are scheduled (`sim.blocks`), a prefix cache of whole blocks, and
recompute preemption when blocks run out. It decides steps only (`schedule` / `update`), with no
clock and no store, so a comparison with vLLM and the engine drive the same object.
"""
from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np

from sim.blocks import POOLS
from sim.errors import KvsimError
from sim.trace import BLOCK_TOKENS


class Job:
    """One turn being served: its history, what it reuses, what it computes and holds in HBM."""
    __slots__ = ("i", "sid", "arrival", "keys", "hist", "prompt", "output", "ctx_in", "hit", "hit_entries",
                 "computed", "res_bytes", "done_iter", "ctx", "save_end", "truncated", "saved_prompt_bytes",
                 "admitted", "hashed", "clipped")

    def __init__(self, i, sid, arrival, keys, hist, prompt, output, truncated, hashed=False, clipped=0):
        self.i, self.sid, self.arrival, self.keys = i, sid, arrival, keys
        self.hashed = hashed  # reuse by shared prefix blocks' hashes (Mooncake) rather than by session
        self.hist, self.prompt, self.output, self.truncated = hist, prompt, output, truncated
        self.ctx_in = hist + prompt
        self.hit = 0
        self.hit_entries = ()
        self.saved_prompt_bytes = 0.0
        self.save_end = 0.0
        self.admitted = False
        self.clipped = clipped  # prompt and reply tokens cut so that the turn fits the context window


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
        # a job's KV: bounded by the window on sliding-window layers (ModelShape.kv_bytes)
        self.kv_bytes = shape.kv_bytes_fn()
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
        self.w_session = workload.session  # shared, not copied
        # typed arrays (8 bytes a turn) read as plain Python ints: numpy scalars would leak into the clock
        self.w_prompt = array("q", workload.prompt_tokens.astype(np.int64).tobytes())
        self.w_output = array("q", workload.output_tokens.astype(np.int64).tobytes())
        self.w_hashes = workload.prefix_hashes

    # ---- a turn becomes a job: truncation and reuse keys ----------------------------------
    def make_job(self, i, t, new=Job) -> Job:
        """Turn `i`, arriving at `t`, as a job built by `new` (a `Job`, or a class taking `Job`'s arguments:
        the chunked engine's `TurnRequest`)."""
        sid = self.w_session[i]
        prompt = self.w_prompt[i]
        output = self.w_output[i]
        hashes = self.w_hashes[i]
        window = self.context_window
        # a turn longer than the window keeps its reply (up to window - 1 tokens) and as much of its prompt
        # as fits; the cut is counted (clipped_tokens) and the turn marked truncated, never silent
        asked = prompt + output
        # min() spelled out: a call each, per turn
        if output > window - 1:
            output = window - 1
        if prompt > window - output:
            prompt = window - output
        if hashes is not None:
            # Mooncake-style request: reuse is of the input's own leading blocks, from any request
            return new(i, sid, t, reusable_block_keys(hashes, prompt), 0, prompt, output, asked > window, True,
                       asked - prompt - output)
        hist = self.session_context.get(sid, 0)
        room = window - prompt - output
        kept = room if room < hist else hist
        # history overflowing the window: drop the oldest tokens (CachedAttention §3.5);
        # a history truncated to nothing has nothing to reuse
        return new(i, sid, t, (sid,) if kept else (), kept, prompt, output, kept < hist, False,
                   asked - prompt - output)

    def enqueue(self, job: Job) -> None:
        self.queue.append(job)
        self.queue_version += 1
        if self.prefetch and len(self.queue) <= self.window_jobs:
            self.entered_window.append(job)

    def finished(self, job: Job, ctx: int) -> None:
        if not job.hashed:
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
        full = self.kv_bytes(job.ctx_in + job.output)
        if self.ra_factor != 1.0 and hit:
            full -= self.kv_bytes(hit) * (1.0 - self.ra_factor)
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


# ---- chunked prefill over paged KV (vLLM V1) ------------------------------------------------

# vLLM's defaults for an OpenAI-compatible server on a GPU with >= 70 GiB that is not an A100
# (H100/H200): EngineArgs.get_batch_defaults, vllm/engine/arg_utils.py (0.32.0).
VLLM_GPU_MAX_NUM_BATCHED_TOKENS = 8192
VLLM_GPU_MAX_NUM_SEQS = 1024
VLLM_BLOCK_TOKENS = 16  # CacheConfig's default block size on CUDA
PREEMPTION_MODES = ("recompute", "swap")
VLLM_SWAP_SPACE_BYTES = 4 * 2**30  # vLLM's --swap-space default: 4 GiB of host memory per GPU
SCHEDULER_KINDS = ("prefill_first", "chunked")


@dataclass(frozen=True)
class ChunkedConfig:
    """Settings of `ChunkedScheduler`; defaults are vLLM 0.32.0's for a GPU server (above),
    `long_prefill_token_threshold` 0 (off) and `watermark` 0.0 (off) as `SchedulerConfig`'s."""
    num_blocks: int  # usable KV blocks in HBM (vLLM's num_gpu_blocks less its null block)
    max_num_batched_tokens: int = VLLM_GPU_MAX_NUM_BATCHED_TOKENS  # token budget of one step
    max_num_seqs: int = VLLM_GPU_MAX_NUM_SEQS  # running requests at most
    block_tokens: int = VLLM_BLOCK_TOKENS
    long_prefill_token_threshold: int = 0  # cap on one request's tokens per step; 0 = off
    watermark: float = 0.0  # share of blocks an admission must leave free; 0 = off
    preemption: str = "recompute"
    max_model_len: int | None = None  # a request stops when prompt + output reaches it
    prefix_caching: bool = True  # vLLM's enable_prefix_caching: off, no block is ever looked up or cached
    # `sim.blocks.RunPool` (runs of blocks: the simulator's) or `ExactPool` (block ids: an executor's);
    # the same decisions, checked by tests/test_block_pools.py
    pool: str = "runs"
    # swap preemption: tokens of KV the host's swap space holds (vLLM's --swap-space over the KV per token)
    swap_tokens: int = 0
    # the caller's keys promise that no request looks up blocks of another running request's last
    # (open-ended) key chain: the engine's (a session's next turn arrives after its reply; a Mooncake
    # reply's chain is its own turn's). A running request's blocks there then take their keys when it
    # is released (or `settle`d), not step by step: the same keys in the same order, fewer calls.
    lazy_tail_keys: bool = False
    # a finished request keeps its blocks until the caller calls `free_finished` (vLLM's KV connector:
    # `request_finished` answers delay_free_blocks while an asynchronous save still reads them)
    hold_finished: bool = False

    def __post_init__(self):
        for name in ("num_blocks", "max_num_batched_tokens", "max_num_seqs", "block_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise KvsimError(f"scheduler.{name}: expected an integer >= 1, got {v!r}")
        if not isinstance(self.long_prefill_token_threshold, int) or self.long_prefill_token_threshold < 0:
            raise KvsimError(f"scheduler.long_prefill_token_threshold: expected an integer >= 0 (0 = off), "
                             f"got {self.long_prefill_token_threshold!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise KvsimError(f"scheduler.watermark: expected a share of the blocks in [0, 1), got {self.watermark!r}")
        if self.pool not in POOLS:
            raise KvsimError(f"scheduler.pool: expected one of {tuple(POOLS)}, got {self.pool!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise KvsimError(f"scheduler.preemption: expected one of {PREEMPTION_MODES}, got {self.preemption!r}")
        if not isinstance(self.swap_tokens, int) or self.swap_tokens < 0:
            raise KvsimError(f"scheduler.swap_space: expected room for >= 0 tokens, got {self.swap_tokens!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise KvsimError(f"scheduler.max_model_len: expected an integer >= 2 or none, got {self.max_model_len!r}")

    @property
    def watermark_blocks(self) -> int:
        # vLLM: int(watermark * num_gpu_blocks), the null block included
        return int(self.watermark * (self.num_blocks + 1))


class SeqRequest:
    """One request as the chunked scheduler sees it: a prompt, a reply of at most `max_tokens`
    (its real length is not known in advance: the caller stops it through `max_tokens`), and the
    key of every block of its token sequence (prompt then reply), as `block_key(i)` or a list.

    `num_computed_tokens` is how many tokens have KV in HBM; `num_tokens` = prompt + output so far.
    """
    __slots__ = ("id", "prompt_tokens", "max_tokens", "block_key", "segments", "num_computed_tokens",
                 "num_output_tokens", "blocks", "num_blocks", "num_cached_blocks", "num_preemptions", "finished",
                 "swapped_tokens", "stop_output")

    def __init__(self, id, prompt_tokens: int, max_tokens: int, block_key=None, segments=None):
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError(f"request {id!r}: prompt_tokens and max_tokens must be >= 1")
        if (block_key is None) == (segments is None):
            raise ValueError(f"request {id!r}: give block_key or segments")
        self.id = id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.block_key = block_key if block_key is None or callable(block_key) else block_key.__getitem__
        # the keys as chains (`sim.blocks`): [(first block, chain, its position)], the last open-ended
        self.segments = segments
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.blocks: list = []  # the pool's record of its blocks, in token order
        self.num_blocks = 0
        self.num_cached_blocks = 0  # leading blocks already in the prefix cache
        self.num_preemptions = 0
        self.finished = False
        self.swapped_tokens = 0  # KV swapped out to host memory by a swap preemption, until swapped back in

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output_tokens

    def __repr__(self):
        return (f"SeqRequest({self.id!r}, computed={self.num_computed_tokens}/{self.num_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens})")


_NO_STOP = 1 << 62  # steps to the first stop with no request running
_new_tuple = tuple.__new__  # builds a `Scheduled` without its Python-level __new__


class Scheduled(NamedTuple):
    req: SeqRequest
    num_new_tokens: int
    # the request has output and only its last sampled token is left to compute (a resumed
    # request whose prefix hit leaves exactly that token counts too)
    is_decode: bool


class StepPlan:
    """One step's decisions. Until `update`, each scheduled request's `num_computed_tokens` is
    still the count before this step (its history for the chunk). (A slotted class, not a dataclass:
    one is built per simulated step.)"""
    __slots__ = ("entries", "_scheduled", "preempted", "admitted", "free_blocks", "num_scheduled_tokens",
                 "external", "swapped_out", "swapped_in", "num_decodes", "decode_context_tokens", "chunks",
                 "decoded")

    def __init__(self, scheduled: list, preempted: list, admitted: dict, free_blocks: int,
                 num_scheduled_tokens: int = 0, external: dict | None = None, swapped_out: list | None = None,
                 swapped_in: dict | None = None, num_decodes: int = 0, decode_context_tokens: int = 0,
                 chunks: list | None = None, decoded: list | None = None):
        # (request, new tokens, is decode) per scheduled request: running ones in queue order, then
        # admissions; `scheduled` gives them as `Scheduled`, built on first use (the engine reads these)
        self.entries = scheduled
        # running requests whose decodes the scheduler planned at once (one token each, in queue order):
        # their entries (request, 1, True) come before `entries` and are built only by `scheduled`
        self.decoded = decoded
        self._scheduled = None  # built by `scheduled` on first use
        self.preempted = preempted  # in preemption order
        self.admitted = admitted  # SeqRequest -> prefix-cache hit tokens, in admission order
        self.free_blocks = free_blocks  # after this step's allocations and preemptions, before its finishes
        self.num_scheduled_tokens = num_scheduled_tokens
        # admitted request -> tokens an external store supplied beyond its prefix-cache hit (`external_hit`)
        self.external = {} if external is None else external
        # swap preemption: (request, tokens) copied to host memory before this step (in preemption order),
        # and admitted request -> tokens copied back before this step
        self.swapped_out = [] if swapped_out is None else swapped_out
        self.swapped_in = {} if swapped_in is None else swapped_in
        # what a caller prices, gathered as the step was planned (`ChunkedScheduler.schedule` fills them):
        # the decodes, their context tokens (prompt + output each), and the prefill chunks as
        # (new tokens, computed tokens before the step) in scheduling order
        self.num_decodes = num_decodes
        self.decode_context_tokens = decode_context_tokens
        self.chunks = [] if chunks is None else chunks

    @property
    def scheduled(self) -> list:
        """[Scheduled]: running requests in queue order, then admissions."""
        s = self._scheduled
        if s is None:
            s = self.entries
            if s and type(s[0]) is not Scheduled:  # the scheduler's plain tuples (a caller may give `Scheduled`)
                s = [_new_tuple(Scheduled, e) for e in s]
            if self.decoded:
                s = [_new_tuple(Scheduled, (r, 1, True)) for r in self.decoded] + s
            self._scheduled = s
        return s

    def __repr__(self):
        return (f"StepPlan({len(self.scheduled)} scheduled, {len(self.preempted)} preempted, "
                f"{len(self.admitted)} admitted, free_blocks={self.free_blocks})")


@dataclass
class PreemptionStats:
    preemptions: int = 0
    # tokens whose KV was dropped by recompute preemptions
    dropped_tokens: int = 0
    # tokens whose KV a swap preemption copied to host memory, and those copied back on resumption
    # (fewer where the prefix cache still held the request's first blocks)
    swapped_tokens: int = 0
    swapped_in_tokens: int = 0
    # dropped tokens computed again after resumption: what the prefix cache did not give back
    recomputed_tokens: int = 0


class ChunkedScheduler:
    """Chunked prefill over paged KV with a prefix cache, as vLLM V1's `Scheduler` does it
    (vllm/v1/core/sched/scheduler.py `schedule`, 0.32.0, FCFS, synchronous; rules and line
    references in bench/vllm_scheduler/README.md):

    * one token budget per step; running requests first, in queue order, each taking
      `num_tokens - num_computed_tokens` tokens (1 for a decode), capped by the threshold and
      the budget left; there are no prefill or decode phases, so a step mixes decodes and chunks;
    * a running request that cannot get its blocks preempts the last running request (the most
      recently admitted) and retries, until it fits or is itself the victim (then the running
      loop ends); a preempted request frees its blocks, forgets its progress and goes to the
      front of the waiting queue, to recompute prompt + output after a fresh prefix lookup;
    * waiting requests are admitted only in a step that preempted none, in strict FCFS order
      while budget and `max_num_seqs` allow: the first that does not fit ends the scan. Its
      prefix hit is whole cached blocks from the start, at most `num_tokens - 1` tokens, and it
      is admitted only if its whole current sequence fits in the free blocks (hit blocks waiting
      in the free queue counted as needed): a check, not a reservation;
    * blocks are allocated as tokens are scheduled and enter the prefix cache once scheduled to
      be full (`sim.blocks.BlockPool`); a finished request frees its blocks at once.

    The decisions need no clock: `schedule()` plans a step, `update(plan)` applies it (computed
    tokens advance, a request whose computed tokens reach its known tokens samples one token,
    a request stops at `max_tokens`). A caller prices the step between the two.

    Pure-decode stretches need not be stepped one by one: `decode_run_limit()` says how many
    steps in a row will schedule exactly one decode token for every running request and nothing
    else, and `apply_decodes(k)` applies k of them at once with the same block allocations
    (step-major, in running order) and the same prefix-cache entries as k schedule/update pairs.

    `external_hit(req, hit_tokens)`, when given, is a KV store behind HBM (vLLM's KV connector,
    `get_num_new_matched_tokens`): at admission, after the prefix-cache hit, it returns how many
    further tokens (whole blocks) it supplies; they count as computed, get blocks like the hit's
    tail, and the caller loads them during the admitting step (`StepPlan.external`).
    """

    def __init__(self, cfg: ChunkedConfig, external_hit=None):
        self.cfg = cfg
        self.pool = POOLS[cfg.pool](cfg.num_blocks)
        self.waiting: deque[SeqRequest] = deque()
        self.running: list[SeqRequest] = []
        self.stats = PreemptionStats()
        self.external_hit = external_hit
        self._planned: StepPlan | None = None
        # preempted request -> tokens it had computed: those it computes again are recompute
        self._dropped: dict[SeqRequest, int] = {}
        # the last step found the waiting queue empty or its head unable to start, and nothing has
        # changed that since (no finish, no preemption, no arrival at an empty queue). While it is False,
        # `decode_run_limit` is 0: a caller may read it to skip the call
        self.blocked = False
        # pure-decode stretches have filled blocks not yet given their keys (`apply_decodes`)
        self._lazy = False
        self._swap_used = 0  # tokens held in the swap space
        self._swapped_out: list = []  # this step's swap-outs, for its plan
        # `_decoding` when the last `schedule` planned the running requests' decodes at once (`StepPlan.decoded`)
        self._all_decode = None
        # the running requests' context tokens, as `decode_run_limit` last found them, and whether it
        # stopped the stretch short of a preemption (more free blocks would lengthen it)
        self.decode_context_tokens = 0
        self.decode_block_limited = False
        # the running batch as pure decodes, kept where the running requests change (`update`,
        # `apply_decodes`, whose loops visit them anyway) rather than scanned again before each stretch:
        # (context tokens, steps to the first stop, every one past its last chain's start: `_scan_decodes`)
        # while all of them decode, False while one does not, None when not known (`schedule` plans a change)
        self._decoding = None
        # `RunPool` keeps a request's unkeyed blocks as a count: a stretch's blocks are counted in
        # `apply_decodes`' own loop and taken at once (`allocate_counted`); other pools allocate them
        self._counted = hasattr(self.pool, "allocate_counted")
        self.first_sampled: list[SeqRequest] = []  # requests whose first output token the last `update` sampled
        # the settings read on every step, unpacked once (the config is frozen)
        self._bt = cfg.block_tokens
        self._max_len = cfg.max_model_len
        self._budget = cfg.max_num_batched_tokens
        # a step holds at most this many running requests' decodes (a seat and a token each)
        self._seats = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self._caching = cfg.prefix_caching
        self._watermark = cfg.watermark_blocks
        self._hold = cfg.hold_finished
        self._lazy_tail = cfg.lazy_tail_keys

    @property
    def free_blocks(self) -> int:
        return self.pool.num_free

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, req: SeqRequest) -> None:
        if self._lazy_tail and req.segments is None:
            raise ValueError(f"request {req.id!r}: lazy_tail_keys needs keys given as segments")
        # the output count it stops at: max_tokens, or where prompt + output reaches max_model_len
        m = self._max_len
        req.stop_output = req.max_tokens if m is None or req.max_tokens < m - req.prompt_tokens \
            else m - req.prompt_tokens
        if not self.waiting:
            self.blocked = False  # a new head of the queue: it may start at once
        self.waiting.append(req)

    def _external_tokens(self, req: SeqRequest, hit: int, whole: int) -> int:
        """Tokens a waiting request takes from outside HBM (`external_hit`: the host store) after its `hit`
        prefix-cache tokens: whole blocks only, up to its `whole` blocks that leave at least one token to
        compute (vLLM's `get_num_new_matched_tokens`)."""
        bt = self._bt
        ext = self.external_hit(req, hit)
        room = whole * bt - hit
        ext = (room if room < ext else ext) // bt * bt
        return ext if ext > 0 else 0

    # ---- one step ------------------------------------------------------------------------
    def _one_block_each(self, running, advance: bool = False) -> None:
        """Every running request decodes one token: at most one new block each, which the free queue holds
        (the caller checked). `RunPool.allocate_decodes(running, 1, bt)`, counted inline for the counting
        pool (the step every turn's decodes take). With `advance`, each also gains the token (computed and
        output: `update`'s part, for a caller that applies the step at once and reads no count in between)."""
        bt, pool = self._bt, self.pool
        if self._counted:
            total = 0
            for r in running:
                c = r.num_computed_tokens
                room = r.num_blocks * bt - c
                if room <= 0:  # its blocks are full: its token needs one
                    n = -room // bt + 1
                    r.num_blocks += n
                    total += n
                if advance:
                    r.num_computed_tokens = c + 1
                    r.num_output_tokens += 1
            if total:
                pool.allocate_counted(total)
            return
        pool.allocate_decodes(running, 1, bt)
        if advance:
            for r in running:
                r.num_computed_tokens += 1
                r.num_output_tokens += 1

    def schedule(self) -> StepPlan:
        if self._planned is not None:
            raise RuntimeError("schedule() called twice without update()")
        pool, bt = self.pool, self._bt
        budget = self._budget
        # the threshold keeps a long prefill from starving others: with no others it is off
        threshold = self.cfg.long_prefill_token_threshold
        if threshold and len(self.running) + len(self.waiting) <= 1:
            threshold = 0
        max_len = self._max_len
        preempted: list[SeqRequest] = []
        running = self.running
        caching = self._caching
        num_decodes = decode_ctx = 0
        chunks = []
        dec = self._decoding
        B = len(running)
        self._all_decode = None
        if B and dec and (dec[2] or not caching) and B <= budget and B <= pool.num_free:
            # every running request decodes (`_decoding`): one token each, which the budget holds; at most
            # one new block each, which the free queue holds; none keys a block here (`lazy_tail_keys`).
            # The general loop below would do the same, request by request.
            self._one_block_each(running)
            self._all_decode = dec  # for `update`
            decoded = running.copy()  # the plan's entries (r, 1, True), built only if someone asks
            num_decodes = B
            decode_ctx = dec[0]
            budget -= B
            i = B
            if self._lazy:  # no block filled by the stretches lies outside its request's last chain
                self._lazy = False
        else:
            decoded = None
            i = 0
        scheduled = []  # the plan's entries after `decoded`: (request, new tokens, is decode)
        append = scheduled.append
        lazy_tail = self._lazy_tail
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed_tokens
            out = req.num_output_tokens
            total = req.prompt_tokens + out
            decode = out > 0 and computed == total - 1
            if decode and (max_len is None or total < max_len):
                # a decode (the common case): one token, which no threshold or budget cuts
                n = 1
            else:
                n = total - computed
                if 0 < threshold < n:
                    n = threshold
                if n > budget:
                    n = budget
                if max_len is not None and n > max_len - computed - 1:
                    n = max_len - computed - 1
                if n <= 0:
                    i += 1
                    continue
            # its block(s) and newly full blocks, inline: the simulator's hottest loop
            need = -(-(computed + n) // bt) - req.num_blocks
            if need <= pool.num_free:
                if need > 0:
                    pool.allocate(req, need)
                if caching:
                    full = (computed + n if computed + n < total else total) // bt
                    if full > req.num_cached_blocks and not (lazy_tail and req.num_cached_blocks >= req.segments[-1][0]):
                        pool.cache(req, full)
            else:
                fits = True
                while not self._allocate_running(req, n):
                    # under FCFS the victim comes after `req` in the queue: it was not scheduled yet
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        fits = False
                        break
                if not fits:
                    break
            if decode:
                append((req, n, True))
                num_decodes += 1
                decode_ctx += total
            else:
                append((req, n, False))
                chunks.append((n, computed))
            budget -= n
            i += 1

        admitted = {}
        external = {}
        swapped_in = {}
        self.blocked = False
        if self._lazy:
            # blocks filled by pure-decode stretches enter the prefix cache before anyone looks up
            # (with `lazy_tail_keys`, those outside the request's last chain only)
            for r in running:
                full = r.num_computed_tokens // bt
                if full > r.num_cached_blocks and not (lazy_tail and r.num_cached_blocks >= r.segments[-1][0]):
                    pool.cache(r, full)
            self._lazy = False
        if not preempted:
            waiting = self.waiting
            watermark = self._watermark if running else 0
            max_seqs = self.cfg.max_num_seqs
            while budget > 0 and waiting and len(running) < max_seqs:
                req = waiting[0]
                total = req.prompt_tokens + req.num_output_tokens
                whole = (total - 1) // bt  # whole blocks that leave at least one token to compute
                hit_handle, hit_blocks, evictable = pool.lookup(req, whole if caching else 0)
                hit = hit_blocks * bt
                ext = 0
                if req.swapped_tokens:
                    # swapped back in: its KV after the prefix hit comes from host memory, partial block too
                    ext = req.swapped_tokens - hit if req.swapped_tokens > hit else 0
                elif self.external_hit is not None:
                    ext = self._external_tokens(req, hit, whole)
                n = total - hit - ext
                if threshold and threshold < n:  # (threshold >= 0)
                    n = threshold
                if n > budget:
                    n = budget
                full = total if max_len is None or total < max_len else max_len
                need = -(-full // bt) - hit_blocks
                need = (need if need > 0 else 0) + evictable
                if need + watermark > pool.num_free:
                    self.blocked = True
                    break  # strict FCFS: nobody behind it is tried
                computed = hit + ext
                # its hit, then `_allocate(req, computed, n)`: blocks for c tokens, the full ones keyed
                c = computed + n
                pool.admit(req, hit_handle, -(-c // bt), (c if c < total else total) // bt if caching else 0)
                waiting.popleft()
                running.append(req)
                req.num_computed_tokens = computed
                admitted[req] = hit
                if req.swapped_tokens:
                    self._swap_used -= req.swapped_tokens
                    req.swapped_tokens = 0
                    if ext:
                        swapped_in[req] = ext
                        self.stats.swapped_in_tokens += ext
                elif ext:
                    external[req] = ext
                if req.num_output_tokens > 0 and computed == total - 1:
                    append((req, n, True))
                    num_decodes += 1
                    decode_ctx += total
                else:
                    append((req, n, False))
                    chunks.append((n, computed))
                budget -= n
            # what stops the scan (no one waits, no seat, the head does not fit) stays true through
            # pure-decode steps: their allocations only shrink the free queue and the head's hit
            if not waiting or len(running) >= max_seqs:
                self.blocked = True

        plan = StepPlan(scheduled, preempted, admitted, pool.num_free,
                        self._budget - budget, external, self._swapped_out, swapped_in,
                        num_decodes, decode_ctx, chunks, decoded)
        if self._swapped_out:
            self._swapped_out = []
        self._planned = plan
        self._decoding = None  # `update` finds it again
        return plan

    def admit_step(self):
        """The commonest step, planned and applied at once (`schedule` then `update`, without a `StepPlan`):
        the waiting queue's one request, fresh (no output, nothing swapped or dropped), is tried while the
        running requests all decode with none at its stop (`_decoding`), or none runs. None, with nothing
        done, when the step is another; else (the admitted request or None if it did not fit, its
        prefix-cache hit tokens, external tokens (`StepPlan.external`), its new tokens, its computed tokens
        before the step, the decodes, their context tokens, the requests finished), with `first_sampled`
        as `update` leaves it. The same decisions in the same order as `schedule` and `update`
        (tests/test_fast_paths.py drives both on random streams): a step costs one call, not two and a plan.
        A caller prices the admitted request's chunk from the returned figures."""
        waiting = self.waiting
        running = self.running
        B = len(running)
        if len(waiting) != 1 or self._planned is not None or self._dropped or B >= self._seats:
            return None
        req = waiting[0]
        if req.num_output_tokens or req.swapped_tokens:
            return None
        pool, bt = self.pool, self._bt
        caching = self._caching
        dec = self._decoding
        if B:
            if not (dec and dec[1] > 1 and (dec[2] or not caching) and B <= pool.num_free):
                return None
            # `schedule`'s all-decode step, and `update`'s part for the decodes: the admission below reads none
            # of their counts (its lookup sees keyed runs only, and no running request keys one here)
            self._one_block_each(running, True)
            self._all_decode = dec
            decode_ctx = dec[0]
        else:
            self._all_decode = None
            decode_ctx = 0
        self._lazy = False  # with every running request past its last chain's start, none has a block to key
        budget = self._budget - B
        threshold = self.cfg.long_prefill_token_threshold if B else 0  # off with no other request
        max_len = self._max_len
        # `schedule`'s admission of the queue's head (its request has no output: a chunk, not a decode)
        total = req.prompt_tokens
        whole = (total - 1) // bt
        hit_handle, hit_blocks, evictable = pool.lookup(req, whole if caching else 0)
        hit = hit_blocks * bt
        ext = self._external_tokens(req, hit, whole) if self.external_hit is not None else 0
        n = total - hit - ext
        if threshold and threshold < n:
            n = threshold
        if n > budget:
            n = budget
        full = total if max_len is None or total < max_len else max_len
        need = -(-full // bt) - hit_blocks
        need = (need if need > 0 else 0) + evictable
        self.blocked = True  # admitted, the queue is empty; else its head waits for blocks
        if need + (self._watermark if B else 0) > pool.num_free:
            req = None
        else:
            computed = hit + ext
            c = computed + n
            pool.admit(req, hit_handle, -(-c // bt), (c if c < total else total) // bt if caching else 0)
            waiting.popleft()
            running.append(req)
        # `update`: the decodes compute their token and sample the next (none reaches its stop), then the chunk
        self.first_sampled = first = []
        if B:  # the decodes computed their token and sampled the next above
            m, ctx, kmin, tail = B, decode_ctx + B, dec[1] - 1, dec[2]
        else:
            m = ctx = 0
            kmin = _NO_STOP
            tail = self._lazy_tail
        finished = []
        if req is None:
            self._decoding = (ctx, kmin, tail)  # every running request decodes (m == B)
            return None, 0, 0, 0, 0, B, decode_ctx, finished
        c = req.num_computed_tokens = computed + n
        if c >= total:  # its prompt's last chunk: the step samples its first token
            req.num_output_tokens = 1
            first.append(req)
            left = req.stop_output - 1
            if left <= 0:
                req.finished = True
                self._finished(req)
                finished.append(req)
                running.pop()  # it came last (`update`'s filter of the running list)
            else:
                m += 1
                ctx += c + 1
                if left < kmin:
                    kmin = left
                if tail and req.num_cached_blocks < req.segments[-1][0]:
                    tail = False
        self._decoding = (ctx, kmin, tail) if m == len(running) else None
        return req, hit, ext, n, computed, B, decode_ctx, finished

    def update(self, plan: StepPlan) -> list[SeqRequest]:
        """Apply a planned step; returns the requests it finished, in scheduling order (their
        blocks are freed, tail first, in that order)."""
        if plan is not self._planned:
            raise RuntimeError("update() expects the plan of the last schedule()")
        self._planned = None
        finished = []
        self.first_sampled = first = []
        dropped = self._dropped
        entries = plan.entries
        dec = self._all_decode
        # `_scan_decodes` over the requests that sampled and go on (each now decodes: one token left)
        if dec is not None and dec[1] > 1 and not dropped:
            # `schedule` planned the running requests' decodes at once (`_decoding` was kept for them):
            # each computes its token and samples the next, none reaches its stop (nor its first token,
            # nor recomputes dropped KV). The loop below would find the same, one by one.
            decoded = plan.decoded
            for req in decoded:
                req.num_computed_tokens += 1
                req.num_output_tokens += 1
            m = len(decoded)
            ctx, kmin, tail = dec[0] + m, dec[1] - 1, dec[2]
        else:
            ctx = m = 0
            kmin = _NO_STOP
            tail = self._lazy_tail
            if dec is not None:
                entries = [(r, 1, True) for r in plan.decoded] + entries
        for req, n, _ in entries:
            before = req.num_computed_tokens
            c = req.num_computed_tokens = before + n
            if dropped and req in dropped:
                lost = dropped[req]
                if before < lost:
                    self.stats.recomputed_tokens += min(before + n, lost) - before
                if c >= lost:
                    del dropped[req]
            if c >= req.prompt_tokens + req.num_output_tokens:
                # the step's logits for the last known token: one sampled token
                out = req.num_output_tokens = req.num_output_tokens + 1
                if out == 1:
                    first.append(req)
                left = req.stop_output - out
                if left <= 0:
                    req.finished = True
                    self._finished(req)
                    finished.append(req)
                else:
                    m += 1
                    ctx += c + 1
                    if left < kmin:
                        kmin = left
                    if tail and req.num_cached_blocks < req.segments[-1][0]:
                        tail = False
        if finished:
            self.running = [r for r in self.running if not r.finished]
            if self.waiting:
                self.blocked = False  # freed blocks and a free seat may let the queue's head in
        # every running request was scheduled (the entries are running ones) and decodes now, or unknown
        self._decoding = (ctx, kmin, tail) if m == len(self.running) else None
        return finished

    # ---- pure-decode stretches at once -----------------------------------------------------
    def decode_run_limit(self, kmax: int) -> int:
        """How many of the next steps (at most `kmax`) are pure decode steps that nothing changes:
        0 unless every running request is decoding (one token left to compute) within the budget
        and the waiting queue is empty or blocked; then up to the first finish, and only as long as
        every block those steps allocate comes from the free queue (one more would preempt).

        Assumes the blocks a reply fills are not the prefix a waiting request looks up (the engine's
        keys: a session's next turn arrives after its reply ends)."""
        if not self.blocked:  # a waiting request may start: the next step admits it
            return 0
        running = self.running
        B = len(running)
        if not B or self._planned is not None or B > self._budget:
            return 0
        dec = self._decoding
        if not dec:
            if dec is False:
                return 0
            dec = self._decoding = self._scan_decodes()
            if not dec:
                return 0
        ctx, k, _ = dec
        if kmax < k:
            k = kmax
        if k < 1:
            return 0  # a request already at its end (cannot happen after update): step it
        self.decode_context_tokens = ctx
        free = self.pool.num_free
        bt = self._bt
        # at most one block a request per bt steps, plus one: with that many free, every step fits
        if B * (k // bt + 1) <= free:
            self.decode_block_limited = False
            return k
        # the first step at which each request needs a new block (1-based)
        firsts = [r.num_blocks * bt - r.num_computed_tokens + 1 for r in running]
        if self._allocations(firsts, k, bt) <= free:
            self.decode_block_limited = False
            return k
        self.decode_block_limited = True  # the stretch stops where the next block would preempt
        lo, hi = 0, k  # the last k whose allocations fit: allocations grow with k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._allocations(firsts, mid, bt) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _scan_decodes(self):
        """(context tokens, steps to the first stop, whether every one has keyed its blocks up to its last
        chain under `lazy_tail_keys`) if every running request is decoding (one token left to compute,
        output sampled), else False: what `update` and `apply_decodes` keep as `_decoding`."""
        ctx = 0
        kmin = _NO_STOP
        tail = self._lazy_tail
        for r in self.running:
            out = r.num_output_tokens
            total = r.prompt_tokens + out
            if r.num_computed_tokens != total - 1 or not out:
                return False
            ctx += total
            left = r.stop_output - out  # the step that samples its last token
            if left < kmin:
                kmin = left
            if tail and r.num_cached_blocks < r.segments[-1][0]:
                tail = False
        return ctx, kmin, tail

    @staticmethod
    def _allocations(firsts, k: int, bt: int) -> int:
        n = 0
        for j in firsts:
            if j <= k:
                n += (k - j) // bt + 1
        return n

    def apply_decodes(self, k: int) -> list[SeqRequest]:
        """Apply k pure decode steps (k <= `decode_run_limit`) as k schedule/update pairs would:
        each step allocates the blocks its tokens need, step-major in running order, and caches the
        blocks its tokens fill; each request gains k tokens. Returns the requests that finish at the
        k-th step, as `update` does."""
        if k < 1:
            return []
        running = self.running
        bt = self._bt
        if not self._counted:  # its blocks, step-major: the count below then finds none missing
            self.pool.allocate_decodes(running, k, bt)
        # the blocks these steps fill take their keys lazily (`_release`, or before the next lookup):
        # the same keys in the same order, since no one looks up a reply's blocks while it is decoded
        self._lazy = self._caching
        total = 0  # blocks counted below (`RunPool.allocate_decodes`, inline)
        dropped = self._dropped
        dec = self._decoding
        if dec and not dropped:
            # the kept state says who stops when (none recomputes dropped KV): each request gains k tokens
            # and the blocks they need, and only at the first stop does anyone finish (the loop below,
            # without its stops and recompute counts)
            for r in running:
                c = r.num_computed_tokens = r.num_computed_tokens + k
                nb = -(-c // bt)
                if nb > r.num_blocks:
                    total += nb - r.num_blocks
                    r.num_blocks = nb
                r.num_output_tokens += k
            if total:  # taken before any finished request frees its blocks, as the steps would
                self.pool.allocate_counted(total)
            if k < dec[1]:  # nobody stops: the kept state moves by k tokens each
                self._decoding = (dec[0] + len(running) * k, dec[1] - k, dec[2])
                return []
            finished = []
            ctx = 0
            kmin = _NO_STOP
            for r in running:
                left = r.stop_output - r.num_output_tokens
                if left <= 0:
                    r.finished = True
                    finished.append(r)
                else:
                    ctx += r.num_computed_tokens + 1
                    if left < kmin:
                        kmin = left
            self._decoding = (ctx, kmin, dec[2])
            if len(finished) == 1 and self._hold:
                # `_end_running` for one held request (the engine's common case), inline: keyed as a release
                # would, out of the running list in place
                r = finished[0]
                if self._caching:
                    full = r.num_computed_tokens // bt
                    if full > r.num_cached_blocks:
                        self.pool.cache(r, full)
                running.remove(r)
                if self.waiting:
                    self.blocked = False
            else:
                self._end_running(running, finished)
            return finished
        finished = []
        # `_scan_decodes` over those that go on: they still decode (k came from `decode_run_limit`)
        ctx = 0
        kmin = _NO_STOP
        for r in running:
            before = r.num_computed_tokens
            # blocks its tokens need after k steps, beyond those it holds (allocated block by block as each
            # step needs one: the same count)
            nb = -(-(before + k) // bt)
            if nb > r.num_blocks:
                total += nb - r.num_blocks
                r.num_blocks = nb
            r.num_computed_tokens = before + k
            out = r.num_output_tokens = r.num_output_tokens + k
            if dropped and r in dropped:
                lost = dropped[r]
                if before < lost:
                    self.stats.recomputed_tokens += min(before + k, lost) - before
                if before + k >= lost:
                    del dropped[r]
            left = r.stop_output - out
            if left <= 0:
                r.finished = True
                finished.append(r)
            else:
                ctx += before + k + 1
                if left < kmin:
                    kmin = left
        if total:  # taken before any finished request frees its blocks, as the steps would
            self.pool.allocate_counted(total)
        self._decoding = (ctx, kmin, dec[2]) if dec else None
        if finished:
            self._end_running(running, finished)
        return finished

    def _end_running(self, running: list, finished: list) -> None:
        """The finished requests (flagged, in running order) leave the running list, their blocks freed
        or held (`_finished`, inline)."""
        bt, hold, caching = self._bt, self._hold, self._caching
        for r in finished:
            if not hold:
                self._release(r)
            elif caching:  # held: keyed as a release would (a lookup may still hit them)
                full = r.num_computed_tokens // bt
                if full > r.num_cached_blocks:
                    self.pool.cache(r, full)
        if len(finished) == 1:
            running.remove(finished[0])  # in place: nobody else holds the list
        else:
            self.running = [r for r in running if not r.finished]
        if self.waiting:
            self.blocked = False  # freed blocks and a free seat may let the queue's head in

    # ---- blocks --------------------------------------------------------------------------
    def _release(self, req: SeqRequest) -> None:
        """Free a request's blocks, tail first, once the blocks its computed tokens fill have their
        keys (a full block enters the queue's tail, a keyless one its head)."""
        if self.cfg.prefix_caching:
            full = req.num_computed_tokens // self.cfg.block_tokens
            if full > req.num_cached_blocks:
                self.pool.cache(req, full)
        self.pool.free(req)

    def _finished(self, req: SeqRequest) -> None:
        if not self._hold:
            self._release(req)
            return
        # held: its blocks stay referenced (a lookup may still hit them), keyed as a release would
        if self._caching:
            full = req.num_computed_tokens // self._bt
            if full > req.num_cached_blocks:
                self.pool.cache(req, full)

    def free_finished(self, req: SeqRequest) -> None:
        """Free the blocks a finished request held (`hold_finished`): its save has read them."""
        if not req.finished or not self._hold:
            raise RuntimeError(f"request {req.id!r}: free_finished needs a finished request under hold_finished")
        self.pool.free(req)
        if self.waiting:
            self.blocked = False  # the freed blocks may let the queue's head in

    def settle(self) -> None:
        """Give lazily cached blocks their keys now (for a caller that inspects the pool)."""
        if self._lazy or self.cfg.lazy_tail_keys:
            bt = self.cfg.block_tokens
            for r in self.running:
                full = r.num_computed_tokens // bt
                if full > r.num_cached_blocks:
                    self.pool.cache(r, full)
            self._lazy = False
            self._decoding = None  # keys moved: `_scan_decodes` finds them again

    def _allocate_running(self, req: SeqRequest, n: int) -> bool:
        need = -(-(req.num_computed_tokens + n) // self.cfg.block_tokens) - req.num_blocks
        if need > self.pool.num_free:
            return False
        self._allocate(req, req.num_computed_tokens, n)
        return True

    def _allocate(self, req: SeqRequest, computed: int, n: int) -> None:
        """Blocks for `computed + n` tokens, then cache the blocks full after them: vLLM caches at
        schedule time, so a request admitted later in the same step already hits them."""
        bt, pool = self.cfg.block_tokens, self.pool
        need = -(-(computed + n) // bt) - req.num_blocks
        if need > 0:
            pool.allocate(req, need)
        if not self.cfg.prefix_caching:
            return
        total = req.prompt_tokens + req.num_output_tokens
        pool.cache(req, (computed + n if computed + n < total else total) // bt)

    def _preempt(self, req: SeqRequest) -> None:
        """Recompute preemption (vLLM's `_preempt_request`): free the blocks tail first, forget
        the progress, requeue at the front. Swap preemption (vLLM V0's `_preempt_by_swap`, for
        `preemption: swap`): the computed KV is copied to host memory first and copied back when the
        request is admitted again, nothing recomputed; a victim the swap space cannot hold is
        recomputed (V0 would stop with an error)."""
        self.stats.preemptions += 1
        tokens = req.num_computed_tokens
        if self.cfg.preemption == "swap" and tokens and self._swap_used + tokens <= self.cfg.swap_tokens:
            self._swap_used += tokens
            self.stats.swapped_tokens += tokens
            req.swapped_tokens = tokens
            self._swapped_out.append((req, tokens))
            req.num_preemptions += 1
            self._release(req)
            req.num_computed_tokens = 0
            self.waiting.appendleft(req)
            return
        self.stats.dropped_tokens += req.num_computed_tokens
        self._dropped[req] = max(self._dropped.get(req, 0), req.num_computed_tokens)
        req.num_preemptions += 1
        self._release(req)
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
