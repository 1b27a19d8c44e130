"""One serving replica as a SimPy process: the serving loop of prefill iterations, decode spans and finishes.

Follows CachedAttention (arXiv 2403.19708): §3.2 layer-wise pre-loading through a read buffer (the
cost model's pipeline closed form); §3.3 asynchronous saving through a write buffer, or synchronous
saving that stalls the GPU. Who runs next is the scheduler's decision (sim/scheduler.py), where KV
lives is the store's (sim/kvstore.py), what a step costs is the cost model's (sim/costmodel.py).

Turns arrive through `submit` (from `sim.workload.Users`, later a router); an idle replica waits on
its inbox (or, with no router ahead of it, takes the next arrival at once). Events per turn are O(1):
a prefill iteration is one timeout (its layer pipeline is closed form), and decode runs in spans:
between two changes of the running batch every iteration has the same shape, so one timeout advances
the whole span with a closed-form sum of iteration times.
"""
from __future__ import annotations

import heapq
from collections import deque
from heapq import heappop
import math
from itertools import islice

from sim.errors import KvsimError
from sim.eviction import eviction_for
from sim.kvstore import KVStore
from sim.metrics import _SPAN_FLUSH, Recorder
from sim.scheduler import ChunkedConfig, ChunkedScheduler, PrefillFirstScheduler, SeqRequest
from sim.tiers import DRAM, HBM, MISS, NONE, SSD
from sim.trace import BLOCK_TOKENS
from sim.units import GB


class Replica:
    def __init__(self, env, cfg, cost, workload):
        self.env, self.cfg, self.cost = env, cfg, cost
        pol = cfg.policy
        self.policy = pol.kind  # recompute | hbm_prefix | attentionstore
        self.shape = shape = cost.shape
        self.L = shape.layers
        self.kv_tok = shape.kv_bytes_per_token
        self.layerwise = pol.layerwise_preload
        self.buffer_layers = pol.read_buffer_layers
        self.async_save = pol.async_save
        self.max_batch = cfg.scheduler.max_batch
        read_buffer = (self.buffer_layers * shape.max_context_tokens * shape.kv_bytes_per_token_layer
                       if self.policy == "attentionstore" and self.layerwise else 0.0)
        self.sched = None  # set below: the store asks it for the look-ahead map only when evicting
        self.store = KVStore(self.policy, cost.hbm_kv_bytes, cfg.host.dram_bytes, cfg.ssd.bytes, shape, cost,
                             eviction_for(pol.eviction, self.policy, cost), read_buffer, cost.ssd_contention,
                             pol.truncation == "decoupled_pe", lambda: self.sched.lookahead_keys())
        self.sched = PrefillFirstScheduler(cfg, shape, workload, self.store)
        self.ra_factor = self.sched.ra_factor
        self.w_hashes = workload.prefix_hashes
        self.w_next = workload.next_turn
        self.host_next_turn_s = cost.host_next_turn_s
        # a measured profile's extra time of each of the first decode steps after a prefill
        # (cost.after_prefill_s): per step, and how many steps still pay it. None: the profile has no
        # such term (the hot path skips it)
        self.after_prefill = cost.after_prefill_s if cost.decode_after_prefill is not None else None
        self.after_prefill_steps = cost.decode_after_prefill_steps
        self.decode_extra_s = 0.0
        self.decode_extra_left = 0
        self.source = None  # who submits turns (sim.workload.Users); set by attach()
        self.running = []  # heap (done_iter, seq, job)
        self.n_running = 0
        self.iter_count = 0
        self.ctx_sum = 0.0
        self.seq = 0
        self.rec = Recorder(len(workload))
        self.busy_prefill_s = 0.0
        self.busy_decode_s = 0.0
        self.stall_save_s = 0.0
        self.proc = None
        self.horizon_s = math.inf  # the replica yields to SimPy when its clock reaches this (or idles)

    def attach(self, source) -> None:
        """Start serving the turns `source` submits (it provides next_arrival_s, deliver_due, reply_done)."""
        self.source = source
        self.proc = self.env.process(self.serve())

    def submit(self, i: int, arrival_s: float) -> None:
        """A turn arrives: it joins the scheduler's queue (an idle replica is woken by its source)."""
        self.sched.enqueue(self.sched.make_job(i, arrival_s))

    # ---- the serving loop ------------------------------------------------------------------
    def serve(self):
        """The replica's own clock `now` runs the loop; SimPy's clock catches up at each yield.

        Links are closed form, so nothing the replica does can change inside a prefill or a decode
        span: a span and the save stall that follows it share one event, and a prefill whose batch
        nothing can join before decoding starts shares one with the first decode span. `now`
        advances exactly as chained timeouts would (now + delay), so results do not depend on how
        steps are grouped. A decode span is cut where a waiting job could be admitted: at the next
        arrival (when the queue is empty and the batch has room) or the next write-back end.

        The replica pulls its own arrivals (`deliver_due`), so while it is busy nothing outside it
        can act before `horizon_s`: it yields to SimPy only when its clock reaches that horizon, or
        when it goes idle with no arrival pending. A router that can submit to it from outside lowers
        the horizon to its own next decision; while none has (the horizon is infinite), an idle
        replica takes the users' next arrival at once, as the alarm of `source.listen()` would deliver
        it (`deliver_due` at its time, then the replica wakes), without a SimPy event.
        """
        env, sched, store, source = self.env, self.sched, self.store, self.source
        queue = sched.queue
        pending = source.pending  # the source's heap of (arrival time, turn): read to skip a call
        now = env.now
        while True:
            if pending and pending[0][0] <= now:
                source.deliver_due(now)
            if store.releases and store.releases[0][0] <= now:
                store.take_releases(now)
            batch = sched.next_batch(now, self.n_running) if queue else None
            if batch:
                began = now
                dt = self._prefill(batch, now)
                if self.after_prefill is not None:
                    # the next K decode steps pay this prefill's term a step; steps still owed a larger
                    # earlier term keep it: the K steps' total, spread evenly over them
                    x = self.after_prefill(dt)
                    K, left, r = self.after_prefill_steps, self.decode_extra_left, self.decode_extra_s
                    if left and r > x:
                        x = (r * left + x * (K - left)) / K   # left <= K
                    self.decode_extra_s = x
                    self.decode_extra_left = K
                t1 = now + dt
                stall = self._after_prefill(batch, t1)
                if stall == 0.0 and self.n_running and not queue and not (pending and pending[0][0] <= t1):
                    # nothing can join before decoding starts: the first decode span joins the prefill
                    span, k = self._decode_span(t1)
                    now = now + (dt + span)
                    stall = self._after_decode(k, now)
                else:
                    now = t1
                if stall > 0:
                    now = now + stall
                # every step takes time: a clock that does not move (times too far from the origin for
                # their float resolution) or is NaN/inf (a cost out of any physical range) is an error
                if not began < now < math.inf:
                    self._clock_error(now, "a prefill")
                if now >= self.horizon_s:
                    yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            if self.n_running:
                began = now
                dt, k = self._decode_span(now)
                now = now + dt
                stall = self._after_decode(k, now)
                if stall > 0:
                    now = now + stall
                if not began < now < math.inf:
                    self._clock_error(now, "a decode span")
                if now >= self.horizon_s:
                    yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            if queue:
                # the head waits for HBM: only a write-back ending can free it (arrivals are taken as
                # they come, for the look-ahead window's prefetch)
                release = store.next_release_s()
                if release == math.inf:
                    self._never_fits()
                nxt = min(release, source.next_arrival_s())
                if not now + (nxt - now) > now:  # too far from the origin to resolve the step
                    self._clock_error(nxt, "waiting for HBM")
                now = now + (nxt - now)
                if now >= self.horizon_s:
                    yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            # idle: wait for the next submission
            if pending and self.horizon_s == math.inf:
                t = pending[0][0]  # as in `ChunkedReplica.serve`: the next arrival without a SimPy event
                source.deliver_due(t)
            else:
                t = yield source.listen()
            if t > now:
                now = now + (t - now)

    def _clock_error(self, t, doing):
        raise KvsimError(
            f"{self.cfg.source}: the simulated clock stopped advancing ({t!r} s after {doing}, "
            f"{sum(f == f for f in self.rec.finish_s)} of {self.rec.n} turns done); expected finite costs and times: check the "
            f"config's bandwidths and sizes and the trace's times (arrivals relative to the first one)")

    def _never_fits(self):
        job = self.sched.queue[0]
        # what it holds in HBM: the reservation plus the hits already there (pinned while it runs)
        need = self.sched.head_need_bytes() + sum(e.nbytes for e in job.hit_entries if e.tier is self.store.hbm)
        raise KvsimError(
            f"{self.cfg.source}: gpu: turn {job.i} (session {job.sid}) needs "
            f"{need / GB:.2f} GB of KV in HBM but only {self.store.hbm.capacity / GB:.2f} GB "
            f"is left after the weights; expected a larger GPU, more gpu.count or a smaller max_context_tokens")

    # ---- a prefill iteration: layer-wise preload pipeline (§3.2) ----------------------------
    def _prefill(self, batch, now):
        cost, L, rec, store = self.cost, self.L, self.rec, self.store
        if now >= rec.hbm_next_s:
            rec.sample_hbm(now, store.hbm)
        load_layer = compute_layer = head = loaded = 0.0
        tokens = 0
        ready = now
        ssd_bytes = 0.0
        ssd_jobs = []
        ra = self.ra_factor
        for job in batch:
            i = job.i
            code, dram_b, ssd_b, dram_ready = store.hit_sources(job, ra)
            if dram_ready > ready:
                ready = dram_ready
            if ssd_b:
                # its load time is known once the SSD says how fast it reads now (below)
                ssd_jobs.append((i, dram_b / L, ssd_b / L))
                ssd_bytes += ssd_b
                rec.load_s[i] = 0.0
            else:
                load_j = cost.history_load_layer_s(dram_b / L) if dram_b else 0.0
                load_layer += load_j
                rec.load_s[i] = load_j * L
            compute_layer += cost.prefill_compute_layer_s(job.computed, job.hit)
            tokens += job.computed
            head += cost.prefill_head_s(job.computed)
            rec.hit_tier[i] = code
            rec.bytes_loaded[i] = dram_b + ssd_b
            loaded += dram_b + ssd_b
        start = ready
        if ssd_bytes:  # direct SSD reads queue behind prefetches
            start, slow = store.read_ssd_stage(ready, ssd_bytes)
            for i, dram_chunk, ssd_chunk in ssd_jobs:
                load_j = cost.history_load_layer_s(dram_chunk, ssd_chunk, slow)
                load_layer += load_j
                rec.load_s[i] = load_j * L
        # one batched forward pass: its all-reduces run once per layer over all the batch's new tokens
        t = cost.prefill_iteration(load_layer, compute_layer, head, self.buffer_layers, self.layerwise,
                                   cost.comm_layer_s(tokens)).total_s
        if load_layer:
            store.h2d.charge(loaded)
        save = 0.0
        if store.on_host and not self.async_save:
            # synchronous saving: the new prompt KV is written back before decoding resumes
            for j in batch:  # a sliding-window layer saves at most its window (ModelShape.kv_bytes)
                j.saved_prompt_bytes = self.shape.kv_bytes(j.computed)
            prompt_bytes = sum(j.saved_prompt_bytes for j in batch)
            save = prompt_bytes / cost.d2h_bw(prompt_bytes / L)
            self.stall_save_s += save
            store.d2h.charge(prompt_bytes)
        wait = start - now
        self.busy_prefill_s += t
        ttft_end = start + t
        size = len(batch)
        for job in batch:
            i = job.i
            rec.arrival_s[i] = job.arrival
            rec.admit_s[i] = now
            rec.prefill_start_s[i] = start
            rec.prefill_s[i] = t
            rec.fetch_wait_s[i] = wait
            rec.ttft_s[i] = ttft_end - job.arrival
            rec.history_tokens[i] = job.hist
            rec.hit_tokens[i] = job.hit
            rec.computed_tokens[i] = job.computed
            rec.prompt_tokens[i] = job.prompt
            rec.output_tokens[i] = job.output
            rec.truncated[i] = job.truncated or job.clipped > 0
            rec.clipped_tokens[i] = job.clipped
            rec.batch_size[i] = size
        if self.n_running or save or rec.stalled:  # nobody decoding and no save: no gap to stretch
            rec.prefill_stall(self.n_running, wait + t + save, save)
        return wait + t + save

    def _after_prefill(self, batch, now):
        stall = 0.0
        for job in batch:
            if self.store.on_host and self.async_save:
                # asynchronous saving (§3.3): the prompt KV drains through D2H while decoding goes on
                prompt_bytes = self.shape.kv_bytes(job.computed)
                job.save_end = self.store.d2h.transfer(now, prompt_bytes, self.cost.d2h_bw(prompt_bytes / self.L))
                job.saved_prompt_bytes = prompt_bytes
            job.ctx = job.ctx_in + 1
            rem = job.output - 1
            if rem <= 0:
                stall += self._finish(job, now + stall)
                continue
            job.done_iter = self.iter_count + rem
            self.seq += 1
            heapq.heappush(self.running, (job.done_iter, self.seq, job))
            self.n_running += 1
            self.ctx_sum += job.ctx
        if stall:
            self.rec.decode_stall(self.n_running, stall)
        return stall

    # ---- decode spans -------------------------------------------------------------------
    def _decode_span(self, now):
        B = self.n_running
        kmax = self.running[0][0] - self.iter_count  # the span ends at the first finish at the latest
        # an arrival changes the batch only if it can be admitted at once: not while the batch is
        # full, nor behind a queued job (FCFS); it is then taken at the end of the iteration in flight
        queued = self.sched.queue
        pending = self.source.pending  # heap of (arrival time, turn): its head is the next arrival
        cut = pending[0][0] - now if pending and not queued and B < self.max_batch else math.inf
        if queued and self.store.releases:
            r = self.store.releases[0][0] - now
            if r < cut:
                cut = r
        total, k = self.cost.decode_span(B, self.ctx_sum, kmax, cut)
        if self.decode_extra_left:
            n = k if k < self.decode_extra_left else self.decode_extra_left
            total += n * self.decode_extra_s
            self.decode_extra_left -= n
        self.busy_decode_s += total
        # ITL: the span's iterations at their mean length (the cost model does not report its first)
        rec = self.rec
        if rec.stalled:  # the span's first iteration also ends a stall: the recorder splits it
            rec.decode_span(B, k, total / k, 0.0)
        else:  # the hot path: k iterations of B gaps of the span's mean step, straight into the buffers
            counts, times = rec.span_counts, rec.span_times
            counts.append(B)
            counts.append(k)
            times.append(total / k)
        return total, k

    def _after_decode(self, k, now):
        self.iter_count += k
        self.ctx_sum += self.n_running * k
        stall = 0.0
        run = self.running
        while run and run[0][0] <= self.iter_count:
            _, _, job = heapq.heappop(run)
            self.n_running -= 1
            job.ctx = job.ctx_in + job.output
            self.ctx_sum -= job.ctx
            stall += self._finish(job, now)
        if stall:
            self.rec.decode_stall(self.n_running, stall)
        return stall

    # ---- the end of a turn: save (§3.3) and free HBM --------------------------------------
    def _finish(self, job, now):
        i = job.i
        rec, store = self.rec, self.store
        rec.finish_s[i] = now
        for e in job.hit_entries:
            e.users -= 1
        ctx = job.ctx_in + job.output
        stall = 0.0
        if store.on_host:
            saved = store.save_to_host(job, ctx, now, self.w_hashes[i])
            rest = saved - job.saved_prompt_bytes
            if rest < 0:
                rest = 0.0
            if self.async_save:
                end = store.d2h.transfer(now, rest, self.cost.d2h_bw(rest / self.L)) if rest else job.save_end
                release_at = end if end > job.save_end else job.save_end
            else:
                stall = rest / self.cost.d2h_bw(max(rest, 1.0) / self.L)
                self.stall_save_s += stall
                store.d2h.charge(rest)
                release_at = now + stall
            rec.bytes_saved[i] = saved
            store.release(job.res_bytes, release_at, now)
        else:
            store.hbm.reserved -= job.res_bytes
            if self.policy == "hbm_prefix":
                store.keep_in_hbm(job, ctx, now, self.w_hashes[i])
            rec.bytes_saved[i] = 0.0
        if not job.hashed:  # the session's context after this turn, for its next turn's history
            self.sched.session_context[job.sid] = ctx
        self.source.reply_done(i, now, now + stall)
        if self.host_next_turn_s and self.w_next[i] >= 0:
            # the serving loop's host time before it starts another turn: the TP executor's ranks agree
            # on the reply's end, which schedules the session's next turn (gpu.executor.serve_trace).
            # The replica waits; the user's reply ended at `now`.
            stall += self.host_next_turn_s
        return stall


# ---- chunked prefill over paged KV (vLLM V1) ----------------------------------------------------

_NO_LIMIT = 1 << 62  # decode steps in a row when nothing else bounds them


class TurnRequest(SeqRequest):
    """A turn as the chunked scheduler's request and as the store's job at once: `SeqRequest`'s fields
    plus those of `sim.scheduler.Job` that the store and the recorder read (built by
    `PrefillFirstScheduler.make_job`, with `Job`'s arguments). One object a turn instead of a job and a
    request that carries it: the simulator builds one per turn."""
    __slots__ = ("i", "sid", "arrival", "keys", "hist", "prompt", "output", "ctx_in", "hit", "hit_entries",
                 "truncated", "hashed", "clipped", "admitted_s", "sampled")

    def __init__(self, i, sid, arrival, keys, hist, prompt, output, truncated, hashed=False, clipped=0):
        # `Job.__init__`'s fields that a chunked turn uses
        self.i, self.sid, self.arrival, self.keys = i, sid, arrival, keys
        self.hashed = hashed  # reuse by shared prefix blocks' hashes (Mooncake) rather than by session
        self.hist, self.prompt, self.output, self.truncated, self.clipped = hist, prompt, output, truncated, clipped
        ctx_in = self.ctx_in = hist + prompt
        self.hit = 0
        self.hit_entries = ()
        # the recorder's admission time and whether its first token was sampled, kept here as well: a slot
        # reads cheaper than the recorder's columns (-1: not admitted yet)
        self.admitted_s = -1.0
        self.sampled = False
        # `SeqRequest.__init__(i, ctx_in, output, segments=...)` in place (one call fewer a turn): the
        # engine sets `segments` before `add_request`
        if ctx_in < 1 or output < 1:
            raise ValueError(f"request {i!r}: prompt_tokens and max_tokens must be >= 1")
        self.id = i
        self.prompt_tokens = ctx_in
        self.max_tokens = output
        self.block_key = self.segments = None
        self.num_computed_tokens = self.num_output_tokens = self.num_blocks = self.num_cached_blocks = 0
        self.blocks = []
        self.num_preemptions = 0
        self.finished = False
        self.swapped_tokens = 0


class ChunkedReplica:
    """One replica serving with vLLM V1's scheduler (`sim.scheduler.ChunkedScheduler`): every step
    runs the decodes and prefill chunks it plans as one iteration (`cost.iteration`), KV lives in
    paged HBM blocks with a prefix cache, and a request that runs out of blocks is preempted:
    recomputed, or with `scheduler.preemption: swap` its KV copied to host memory over D2H and back
    over H2D before the step that resumes it (`_swap`). Same surface as `Replica` (`attach`, `submit`,
    the recorder and the busy times).

    A turn is one request: its input is the kept history plus the new prompt (truncated to the
    window as `PrefillFirstScheduler.make_job` does) and its reply stops it at its length. Its
    blocks' prefix-cache keys: `("system", i)` inside `workload.shared_prefix_tokens` (a chat
    template's system prompt, shared by every session), else `(session, epoch, i)` (the epoch moves
    when the history is truncated: the remaining tokens sit at other block offsets), or for a
    Mooncake request its 512-token `prefix_hashes` split into blocks, `(hash[i // m], i % m)`. They
    reach the scheduler as chains (`sim.blocks`: one segment per chain), which the run pool keeps
    as runs of blocks.

    Policies: recompute runs with prefix caching off; hbm_prefix with vLLM's automatic prefix
    caching (freed blocks stay cached until their block is reused); attentionstore adds the host
    store as vLLM's KV connector does: at admission the session's saved history (DRAM, else SSD)
    supplies the whole blocks after the HBM hit, loaded layer by layer during the admitting step
    (CachedAttention §3.2), and a finished turn's KV is saved to the host (§3.3). Scheduler-aware
    fetching (§3.4) stages the SSD-resident history of requests in the waiting queue's look-ahead
    window into DRAM; Round Attention scales the host loads (its HBM saving is not modelled here:
    paged blocks hold every layer). A finished turn's blocks stay held until its asynchronous save
    has read them over D2H (vLLM's KV connector answers `delay_free_blocks` and frees them on
    `finished_sending`): a waiting request that needs them starts at the first step after.

    Events stay O(1) per turn: a step with prefill work is one timeout, and a stretch of pure
    decode steps with nothing changing is one timeout priced in closed form (`cost.decode_span`),
    cut at the first finish, the first block the free queue cannot give, or the next arrival
    that could start at once.
    """

    def __init__(self, env, cfg, cost, workload):
        self.env, self.cfg, self.cost = env, cfg, cost
        pol, sch = cfg.policy, cfg.scheduler
        self.policy = pol.kind
        self.shape = shape = cost.shape
        self.L = float(shape.layers)  # divides and multiplies floats only (the specialised float ops)
        self.kv_tok = shape.kv_bytes_per_token
        self.layerwise = pol.layerwise_preload
        self.buffer_layers = pol.read_buffer_layers
        self.async_save = pol.async_save
        bt = self.block_tokens = sch.block_tokens
        self.w_hashes = workload.prefix_hashes
        if BLOCK_TOKENS % bt and any(h is not None for h in self.w_hashes):  # the cheap test first: a scan per turn
            raise KvsimError(f"{cfg.source}: scheduler.block_tokens: expected a divisor of the trace's "
                             f"{BLOCK_TOKENS}-token prefix-hash blocks, got {bt}")
        read_buffer = (self.buffer_layers * shape.max_context_tokens * shape.kv_bytes_per_token_layer
                       if self.policy == "attentionstore" and self.layerwise else 0.0)
        self.store = KVStore(self.policy, cost.hbm_kv_bytes, cfg.host.dram_bytes, cfg.ssd.bytes, shape, cost,
                             eviction_for(pol.eviction, self.policy, cost), read_buffer, cost.ssd_contention,
                             pol.truncation == "decoupled_pe", self._lookahead_keys)
        # turns become jobs (truncation to the window, the session's context) as under prefill-first
        self.turns = PrefillFirstScheduler(cfg, shape, workload, self.store)
        self.ra_factor = self.turns.ra_factor
        num_blocks = int((cost.hbm_kv_bytes - read_buffer) // (bt * self.kv_tok))
        if num_blocks < 1:
            raise KvsimError(f"{cfg.source}: gpu: no HBM is left for one KV block after the weights; expected a "
                             f"larger GPU or more gpu.count")
        self.sched = ChunkedScheduler(
            ChunkedConfig(num_blocks, sch.max_num_batched_tokens, sch.max_num_seqs, bt,
                          sch.long_prefill_token_threshold, sch.watermark, sch.preemption,
                          shape.max_context_tokens, prefix_caching=self.policy != "recompute", lazy_tail_keys=True,
                          swap_tokens=int(sch.swap_space // self.kv_tok),
                          hold_finished=self.store.on_host and self.async_save),
            external_hit=self._external_hit if self.store.on_host else None)
        self.shared_blocks = cfg.workload.shared_prefix_tokens // bt
        self.on_host = self.store.on_host
        self.hold_finished = self.sched.cfg.hold_finished
        self.lookahead_jobs = sch.lookahead_jobs
        # scheduler-aware fetching (§3.4): a request entering the waiting queue's look-ahead window has
        # its SSD-resident history staged into DRAM, as under prefill-first
        self.prefetch = self.turns.prefetch
        self.entered_window = []  # arrivals inside the window since the last step
        self.epoch = {}  # session -> truncations so far (its blocks' key offset)
        self.source = None
        self.rec = Recorder(len(workload))
        self.busy_prefill_s = 0.0  # steps with prefill work (decodes riding along included)
        self.busy_decode_s = 0.0  # pure decode steps
        self.stall_save_s = 0.0
        self.swap_wait_s = 0.0  # steps held by swap preemptions' copies
        self.proc = None
        self.horizon_s = math.inf  # as `Replica.horizon_s`
        # finished requests whose blocks an asynchronous save still reads: (save end, request), freed once
        # the step clock passes the end (vLLM's connector: delay_free_blocks, finished_sending)
        # in order of their ends: each is a transfer's end on the one D2H link, which moves one copy at a
        # time (`Link.transfer`: no end comes before an earlier one's), so a FIFO, not a heap
        self.held = deque()

    @property
    def preemption_stats(self):
        """What preemptions cost (`sim.scheduler.PreemptionStats`), for the summary."""
        return self.sched.stats

    @property
    def peak_hbm_bytes(self) -> float:
        return self.sched.pool.peak_held * self.block_tokens * self.kv_tok

    def attach(self, source) -> None:
        self.source = source
        self.proc = self.env.process(self.serve())

    def submit(self, i: int, arrival_s: float) -> None:
        """A turn arrives: it becomes a request at the tail of the waiting queue (an idle replica is woken
        by its source)."""
        req = self.turns.make_job(i, arrival_s, TurnRequest)
        sched = self.sched
        waiting = sched.waiting
        if self.prefetch and len(waiting) < self.lookahead_jobs:
            self.entered_window.append(req)
        if req.hashed or req.truncated or self.shared_blocks:
            req.segments = self._key_segments(req)
        else:  # `_key_segments`: the session's chain at its epoch, inline (most turns)
            req.segments = [(0, (req.sid, self.epoch.get(req.sid, 0)), 0)]
        # `sched.add_request(req)`, inline (once a turn; its segments are set): `make_job` keeps prompt + reply
        # inside the window, so the reply stops at its length (tests/test_fast_paths.py checks the two agree)
        req.stop_output = req.output
        if not waiting:
            sched.blocked = False  # a new head of the queue: it may start at once
        waiting.append(req)

    def _key_segments(self, job):
        """The request's prefix-cache keys as chains (`sim.blocks`; see the class docstring)."""
        if job.hashed:
            hashes, per = self.w_hashes[job.i], BLOCK_TOKENS // self.block_tokens
            # a block inside the prompt's hashed part holds the tokens its 512-token block's hash names
            n = min(len(hashes) * per, job.prompt // self.block_tokens)
            if len(set(hashes)) < len(hashes):
                # chained hashes never repeat inside a request (a block's hash names its whole prefix);
                # a trace that repeats one is reused only up to the repeat
                first = len(dict.fromkeys(hashes))
                for j, h in enumerate(hashes):
                    if h in hashes[:j]:
                        first = j
                        break
                n = min(n, first * per)
            segs = [(j * per, hashes[j], 0) for j in range(-(-n // per))]
            segs.append((n, ("turn", job.i), n))
            return segs
        sid = job.sid
        ep = self.epoch.get(sid, 0)
        if job.truncated:
            ep += 1  # the history lost its oldest tokens: every block now holds other tokens
            self.epoch[sid] = ep
        nsys = self.shared_blocks if ep == 0 else 0
        if nsys:
            return [(0, "system", 0), (nsys, (sid, ep), nsys)]
        return [(0, (sid, ep), 0)]

    def _lookahead_keys(self):
        """Store keys the first waiting requests will read -> queue position (scheduler-aware eviction)."""
        keys = {}
        for pos, req in enumerate(islice(self.sched.waiting, self.lookahead_jobs)):
            for key in req.keys:
                keys.setdefault(key, pos)
        return keys

    def _fetch_window(self, a: int, now) -> None:
        """After a step's `a` admissions: stage the requests they moved into the window's last places, and
        the arrivals inside the window that still wait (one admitted now loads from SSD layer by layer)."""
        if a and self.sched.waiting:
            store, w = self.store, self.lookahead_jobs
            for req in islice(self.sched.waiting, max(w - a, 0), w):
                store.prefetch(req, now)
        if self.entered_window:
            for job in self.entered_window:
                if job.admitted_s < 0.0:  # not admitted (an arrival since the last step cannot resume)
                    self.store.prefetch(job, job.arrival)
            self.entered_window.clear()

    def _external_hit(self, req, hit: int) -> int:
        """Tokens the host store holds beyond the HBM hit (vLLM's `get_num_new_matched_tokens`)."""
        if not req.keys:
            return 0
        h, entries = self.store.lookup(req)
        req.hit, req.hit_entries = h, entries
        return h - hit if h > hit else 0

    # ---- the serving loop ------------------------------------------------------------------
    def serve(self):
        """As `Replica.serve`: the replica's own clock `now` runs the loop and SimPy's catches up at
        each yield. A pure-decode stretch is cut where an arrival could start at once (the waiting
        queue is empty and a seat is free); arrivals behind a blocked queue head wait for the stretch's
        end, where they would change nothing."""
        env, sched, source, cost, rec = self.env, self.sched, self.source, self.cost, self.rec
        pending = source.pending
        submit = self.submit
        waiting = sched.waiting
        max_seqs = sched.cfg.max_num_seqs
        held = self.held
        # bound once: the loop runs a few times per turn
        run_limit, apply_decodes, decode_span = sched.decode_run_limit, sched.apply_decodes, cost.decode_span
        schedule, update, iteration_s, admit_step = sched.schedule, sched.update, cost.iteration_s, sched.admit_step
        finish = self._finish
        buffer_layers, layerwise, prefetch = self.buffer_layers, self.layerwise, self.prefetch
        entered_window = self.entered_window
        # the ITL histogram's span buffers (`Recorder.decode_span` without a stall pending, inline)
        span_counts, span_times = rec.span_counts, rec.span_times
        ttft_s = rec.ttft_s
        pool, hbm_block = sched.pool, self.block_tokens * self.kv_tok
        bt = sched._bt
        inf = math.inf
        now = env.now
        hbm_next = rec.hbm_next_s
        horizon = self.horizon_s
        # the users' next arrival (`source.next_arrival_s()`): their queue moves only when a reply ends
        # (`_finish`) and when this loop takes from it or yields
        nxt = pending[0][0] if pending else inf
        while True:
            while nxt <= now:  # `source.deliver_due(now)`, inline (once a turn)
                t, i = heappop(pending)
                if i == source.first:
                    source.next_first()
                submit(i, t)
                nxt = pending[0][0] if pending else inf
            while held and held[0][0] <= now:  # their saves have read them: `free_finished`, inline
                pool.free(held.popleft()[1])
                if waiting:
                    sched.blocked = False  # the freed blocks may let the queue's head in
            running = sched.running
            if running or waiting:
                began = now
                k = 0
                if sched.blocked:  # not blocked: the next step may admit
                    # `decode_run_limit(_NO_LIMIT)`'s commonest case, inline (once per stretch): every running
                    # request decodes (its kept state) and enough blocks are free for a block each per bt
                    # steps; anything else asks it
                    B = len(running)
                    dec = sched._decoding
                    if dec and 0 < B <= sched._budget and sched._planned is None:
                        ctx, k, _ = dec
                        if k >= 1 and B * (k // bt + 1) <= pool.num_free:
                            sched.decode_context_tokens = ctx
                            sched.decode_block_limited = False
                        else:
                            k = run_limit(_NO_LIMIT)
                    else:
                        k = run_limit(_NO_LIMIT)
                if k:
                    # cut where an arrival could start at once (`source.next_arrival_s()`, inline)
                    cut = nxt - now if not waiting and B < max_seqs else inf
                    if held and (waiting or sched.decode_block_limited) and held[0][0] - now < cut:
                        cut = held[0][0] - now  # blocks a save frees may let the queue's head in, or avert a preemption
                    dt, k = decode_span(B, sched.decode_context_tokens, k, cut)
                    self.busy_decode_s += dt
                    # every request gets a token each step: B gaps per step, at the span's mean step
                    if rec.stalled:
                        rec.decode_span(B, k, dt / k, 0.0)
                    else:
                        span_counts.append(B)  # appends: cheaper than extends by built tuples
                        span_counts.append(k)
                        span_times.append(dt / k)  # iterations of equal length (`GapHistogram`'s flat spans)
                    now = now + dt
                    finished = apply_decodes(k)
                else:
                    step = admit_step()
                    if step is not None:
                        # the commonest step, planned and applied at once (`ChunkedScheduler.admit_step`): the
                        # queue's one request joins the decodes. Priced as below from the figures it returns.
                        plan = None
                        r, hit, e, n, computed, B, ctx, finished = step
                        start = now
                        if r is not None:
                            load_layer, start = self._admit_one(r, hit, e, now)
                            t = iteration_s([(n, computed)], B, ctx, load_layer, buffer_layers, layerwise)
                            self.busy_prefill_s += t
                            admitted = 1
                        elif B:  # the head did not fit: the decodes alone
                            t = decode_span(B, ctx, 1)[0]
                            self.busy_decode_s += t
                            admitted = 0
                        elif held:  # nothing runs until a save frees its blocks
                            now = held[0][0]
                            continue
                        else:
                            self._never_fits()
                        size = B + 1
                    else:
                        plan = schedule()
                        if not plan.entries and not sched.running:
                            if held:  # nothing runs until a save frees its blocks
                                update(plan)
                                now = held[0][0]
                                continue
                            self._never_fits()
                        # price the step (before `update`: each chunk's cached context is the request's computed
                        # tokens so far) and record its admissions
                        B = plan.num_decodes
                        start = now
                        load_layer = 0.0
                        ext = plan.external
                        admitted = len(plan.admitted)
                        if admitted:
                            load_layer, start = self._admit(
                                [(r, hit, ext.get(r, 0) if ext else 0) for r, hit in plan.admitted.items()], now)
                        if plan.swapped_out or plan.swapped_in:
                            start = self._swap(plan, start)
                        if plan.chunks or load_layer:
                            t = iteration_s(plan.chunks, B, plan.decode_context_tokens, load_layer, buffer_layers,
                                            layerwise)
                            self.busy_prefill_s += t
                        else:
                            t = decode_span(B, plan.decode_context_tokens, 1)[0]
                            self.busy_decode_s += t
                        size = plan.num_decodes + len(plan.chunks)  # each scheduled request decodes or runs a chunk
                    dt = start + t - now
                    if prefetch:
                        if waiting:
                            self._fetch_window(admitted, now)
                        elif entered_window:  # every arrival since the last step was admitted: none to stage
                            entered_window.clear()
                    if B:  # the decodes riding in this step wait for all of it
                        if rec.stalled:
                            rec.decode_span(B, 1, dt, 0.0)
                        else:
                            span_counts.append(B)
                            span_counts.append(1)
                            span_times.append(dt)
                    now = now + dt
                    if plan is not None:
                        finished = update(plan)
                    if sched.first_sampled:
                        # requests whose prompt's last chunk ran in this step sampled their first token at
                        # its end (`ChunkedScheduler.first_sampled`, after `update`); inline, once per turn
                        for r in sched.first_sampled:
                            if not r.sampled:  # its first time (a preempted request samples again)
                                r.sampled = True
                                i = r.id
                                ttft_s[i] = now - r.arrival  # the recorder's arrival_s and prefill_start_s
                                rec.prefill_s[i] = now - r.admitted_s
                                rec.batch_size[i] = size
                if now >= hbm_next:  # HBM's KV blocks: referenced by requests, and free ones still cached
                    rec.hbm.sample(now, (pool.num_blocks - pool.num_free) * hbm_block, pool.num_cached_free * hbm_block)
                    hbm_next = rec.hbm_next_s = rec.hbm.next_s
                if finished:
                    stall = 0.0
                    for r in finished:
                        stall += finish(r, now + stall)
                    nxt = pending[0][0] if pending else inf  # their sessions' next turns joined the queue
                    if stall > 0:
                        now = now + stall
                        rec.decode_stall(len(sched.running), stall)  # a synchronous save holds them all
                if not began < now < horizon:  # one test for the common case: the clock moved, no yield due
                    if not began < now < inf:
                        self._clock_error(now, "a decode span" if k else "a step")
                    yield env.timeout(now - env.now if now > env.now else 0.0)
                    horizon = self.horizon_s  # others act only while the replica yields
                    nxt = pending[0][0] if pending else inf
                continue
            # idle: wait for the next submission; with no one outside able to act first (no router lowered the
            # horizon), the users' next arrival is taken at once, as `source.listen()`'s alarm would deliver it
            # (`deliver_due` at its time, then the replica wakes), without a SimPy event
            if nxt < inf and horizon == inf:
                t = nxt
                while nxt <= t:  # `deliver_due(t)`, inline
                    a, i = heappop(pending)
                    if i == source.first:
                        source.next_first()
                    submit(i, a)
                    nxt = pending[0][0] if pending else inf
            else:
                t = yield source.listen()
                horizon = self.horizon_s
                nxt = pending[0][0] if pending else inf
            if t > now:
                now = now + (t - now)

    _clock_error = Replica._clock_error

    def _never_fits(self):
        req = job = self.sched.waiting[0]
        bt = self.block_tokens
        raise KvsimError(
            f"{self.cfg.source}: gpu: turn {job.i} (session {job.sid}) needs {-(-req.num_tokens // bt)} KV blocks "
            f"of {bt} tokens but HBM holds {self.sched.cfg.num_blocks} after the weights; expected a larger GPU, "
            f"more gpu.count or a smaller max_context_tokens")

    # ---- one step with prefill work: the admitted requests' loads, swap copies ------------------
    def _swap(self, plan, start) -> float:
        """Swap preemption's copies, before the step computes (vLLM V0 swaps in the worker before the
        forward pass): the victims' KV out over D2H, the resumed requests' KV back over H2D, each queued
        behind what its link is already moving. Returns when the step can start."""
        store, cost, kv, L = self.store, self.cost, self.kv_tok, self.L
        t = start
        out = sum(n for _, n in plan.swapped_out) * kv
        if out:
            t = store.d2h.transfer(t, out, cost.d2h_bw(out / L))
        back = sum(plan.swapped_in.values()) * kv
        if back:
            t = store.h2d.transfer(t, back, cost.h2d_bw(back / L))
        self.swap_wait_s += t - start
        return t

    def _admit(self, admitted, now):
        """Record each admitted request's first admission and price the external hits' loads, given
        (request, prefix-cache hit tokens, external tokens) each: (load per layer, when the step can start:
        a DRAM copy still being written, the SSD's queue)."""
        rec, L = self.rec, self.L
        load_layer = 0.0
        ready = now
        ssd_bytes = loaded = 0.0
        ssd_loads = []
        firsts = []
        for r, hit, e in admitted:
            i = r.id
            job = r  # the request is the turn's job (`TurnRequest`)
            first = r.admitted_s < 0.0  # its first admission (else it resumes)
            dram_b = ssd_b = load_j = 0.0
            if e:
                dram_b, ssd_b, dram_ready = self._external_bytes(job, hit, e)
                if dram_ready > ready:
                    ready = dram_ready
                loaded += dram_b + ssd_b
                if ssd_b:  # priced below, once the SSD says how fast it reads now
                    ssd_loads.append((i if first else -1, dram_b / L, ssd_b / L))
                    ssd_bytes += ssd_b
                else:
                    load_j = self.cost.history_load_layer_s(dram_b / L)
                    load_layer += load_j
            if not first:
                continue
            firsts.append(i)
            rec.load_s[i] = load_j * L
            self._record_first(job, now, hit, e, dram_b, ssd_b)
        start = ready
        if ssd_bytes:  # direct SSD reads queue behind whatever the SSD is already reading
            start, slow = self.store.read_ssd_stage(ready, ssd_bytes)
            for i, dram_chunk, ssd_chunk in ssd_loads:
                load_j = self.cost.history_load_layer_s(dram_chunk, ssd_chunk, slow)
                load_layer += load_j
                if i >= 0:
                    rec.load_s[i] = load_j * L
        if loaded:
            self.store.h2d.charge(loaded)
        wait = start - now
        for i in firsts:
            rec.fetch_wait_s[i] = wait
        return load_layer, start

    def _record_first(self, r, now, hit: int, e: int, dram_b: float, ssd_b: float) -> None:
        """The recorder's columns of a request's first admission (its load time and fetch wait aside: the
        callers know them at different points)."""
        rec, i = self.rec, r.id
        rec.arrival_s[i] = r.arrival
        rec.admit_s[i] = now
        rec.prefill_start_s[i] = now
        r.admitted_s = now
        rec.history_tokens[i] = r.hist
        rec.hit_tokens[i] = hit + e
        rec.computed_tokens[i] = r.ctx_in - hit - e
        rec.prompt_tokens[i] = r.prompt
        rec.output_tokens[i] = r.output
        if r.truncated or r.clipped:  # the columns start at 0 (not truncated, nothing clipped)
            rec.truncated[i] = True
            rec.clipped_tokens[i] = r.clipped
        rec.bytes_loaded[i] = dram_b + ssd_b
        rec.hit_tier[i] = SSD if ssd_b else DRAM if dram_b else HBM if hit else MISS if r.keys else NONE

    def _admit_one(self, r, hit: int, e: int, now):
        """`_admit` of one request (`admit_step`'s, once per turn): the same figures in the same order,
        without its lists and loops."""
        rec, L = self.rec, self.L
        i = r.id
        dram_b = ssd_b = load_j = 0.0
        ready = now
        if e:
            dram_b, ssd_b, dram_ready = self._external_bytes(r, hit, e)
            if dram_ready > ready:
                ready = dram_ready
            if not ssd_b:
                load_j = self.cost.history_load_layer_s(dram_b / L)
        first = r.admitted_s < 0.0  # its first admission (else it resumes)
        if first:
            self._record_first(r, now, hit, e, dram_b, ssd_b)
        start = ready
        if ssd_b:  # a direct SSD read queues behind whatever the SSD is already reading
            start, slow = self.store.read_ssd_stage(ready, ssd_b)
            load_j = self.cost.history_load_layer_s(dram_b / L, ssd_b / L, slow)
        if first:
            rec.load_s[i] = load_j * L
            rec.fetch_wait_s[i] = start - now
        if dram_b + ssd_b:
            self.store.h2d.bytes_moved += dram_b + ssd_b  # `h2d.charge`, inline
        return load_j, start

    def _external_bytes(self, job, hit: int, ext: int):
        """(DRAM bytes, SSD bytes, when the DRAM copy is ready) of the `ext` tokens after `hit`; with
        Round Attention, layers above the watershed load only the kept rounds (`ra_factor` of the bytes)."""
        if job.hashed:
            d, s, ready = self._block_bytes(job, hit, ext)
        else:  # a session's history: one entry, in one tier
            e = job.hit_entries[0]
            if e.tier is self.store.dram:
                d, s, ready = ext * self.kv_tok, 0.0, e.ready_at
            else:
                d, s, ready = 0.0, ext * self.kv_tok, 0.0
        ra = self.ra_factor
        return (d * ra, s * ra, ready) if ra != 1.0 else (d, s, ready)

    def _block_bytes(self, job, hit: int, ext: int):
        """`_external_bytes` of prefix blocks, before Round Attention's factor."""
        dram, kv = self.store.dram, self.kv_tok
        entries = job.hit_entries
        dram_b = ssd_b = ready = 0.0
        # the store's entries are 512-token blocks: charge each the part of [hit, hit + ext) it holds
        for j in range(hit // BLOCK_TOKENS, -(-(hit + ext) // BLOCK_TOKENS)):
            e = entries[j]
            lo, hi = max(hit, j * BLOCK_TOKENS), min(hit + ext, (j + 1) * BLOCK_TOKENS)
            if e.tier is dram:
                dram_b += (hi - lo) * kv
                if e.ready_at > ready:
                    ready = e.ready_at
            elif e.tier is not self.store.hbm:
                ssd_b += (hi - lo) * kv
        return dram_b, ssd_b, ready

    # ---- the end of a turn: save to the host (§3.3) ------------------------------------------
    def _finish(self, req, now) -> float:
        i = req.id
        job = req  # the request is the turn's job (`TurnRequest`)
        rec, store = self.rec, self.store
        if len(rec.span_counts) >= _SPAN_FLUSH:  # the ITL spans binned as they gather (`Recorder.flush_spans`)
            rec.itl.flush()
        rec.finish_s[i] = now
        if req.num_preemptions:  # the column starts at 0
            rec.preemptions[i] = req.num_preemptions
        ctx = job.ctx_in + job.output
        stall = 0.0
        saved = 0.0
        read_end = now
        if self.on_host:
            saved = store.save_to_host(job, ctx, now, self.w_hashes[i])
            if saved:
                bw = self.cost.d2h_bw(saved / self.L)
                if self.async_save:
                    # the write-back drains through D2H while the next steps run
                    d2h = store.d2h  # `d2h.transfer(now, saved, bw)`, inline (once a turn)
                    read_end = d2h.free_at = (now if now > d2h.free_at else d2h.free_at) + saved / bw
                    d2h.bytes_moved += saved
                else:
                    stall = saved / bw
                    self.stall_save_s += stall
                    store.d2h.charge(saved)
        rec.bytes_saved[i] = saved
        if self.hold_finished:
            if read_end > now:  # the blocks stay until the write-back has read them
                self.held.append((read_end, req))
            else:
                self.sched.free_finished(req)
        if not job.hashed:  # `PrefillFirstScheduler.finished`, inline
            self.turns.session_context[job.sid] = ctx
        self.source.reply_done(i, now, now + stall)
        return stall
