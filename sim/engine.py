"""One serving replica as a SimPy process: the serving loop of prefill iterations, decode spans and finishes.

Follows CachedAttention (arXiv 2403.19708): §3.2 layer-wise pre-loading through a read buffer (the
cost model's pipeline closed form); §3.3 asynchronous saving through a write buffer, or synchronous
saving that stalls the GPU. Who runs next is the scheduler's decision (sim/scheduler.py), where KV
lives is the store's (sim/kvstore.py), what a step costs is the cost model's (sim/costmodel.py).

Turns arrive through `submit` (from `sim.workload.Users`, later a router); an idle replica waits on
its inbox. Events per turn are O(1): a prefill iteration is one timeout (its layer pipeline is
closed form), and decode runs in spans: between two changes of the running batch every iteration
has the same shape, so one timeout advances the whole span with a closed-form sum of iteration times.
"""
from __future__ import annotations

import heapq
import math

from sim.errors import KvsimError
from sim.eviction import eviction_for
from sim.kvstore import KVStore
from sim.metrics import Recorder
from sim.scheduler import PrefillFirstScheduler


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
        self.source = None  # who submits turns (sim.workload.Users); set by attach()
        self._inbox = None  # the event an idle replica waits on
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

    def attach(self, source) -> None:
        """Start serving the turns `source` submits (it provides next_arrival_s, deliver_due, reply_done)."""
        self.source = source
        self.proc = self.env.process(self.serve())

    def submit(self, i: int, arrival_s: float) -> None:
        """A turn arrives: it joins the scheduler's queue; an idle replica wakes."""
        self.sched.enqueue(self.sched.make_job(i, arrival_s))
        if self._inbox is not None:
            ev, self._inbox = self._inbox, None
            ev.succeed(arrival_s)

    # ---- the serving loop ------------------------------------------------------------------
    def serve(self):
        """The replica's own clock `now` runs the loop; SimPy's clock catches up at each yield.

        Links are closed form, so nothing the replica does can change inside a prefill or a decode
        span: a span and the save stall that follows it share one event, and a prefill whose batch
        nothing can join before decoding starts shares one with the first decode span. `now`
        advances exactly as chained timeouts would (now + delay), so results do not depend on how
        steps are grouped. A decode span is cut where a waiting job could be admitted: at the next
        arrival (when the queue is empty and the batch has room) or the next write-back end.
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
                t1 = now + dt
                stall = self._after_prefill(batch, t1)
                if stall == 0.0 and self.n_running and not queue and not source.next_arrival_s() <= t1:
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
                yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            # idle: wait on the inbox for the next submission
            self._inbox = env.event()
            source.listen()
            t = yield self._inbox
            if t > now:
                now = now + (t - now)

    def _clock_error(self, t, doing):
        raise KvsimError(
            f"{self.cfg.source}: the simulated clock stopped advancing ({t!r} s after {doing}, "
            f"{sum(f == f for f in self.rec.finish_s)} of {self.rec.n} turns done); expected finite costs and times: check the "
            f"config's bandwidths and sizes and the trace's times (arrivals relative to the first one)")

    def _never_fits(self):
        job = self.sched.queue[0]
        need = self.sched.head_need_bytes()
        raise KvsimError(
            f"{self.cfg.source}: gpu: turn {job.i} (session {job.sid}) needs "
            f"{need / 1e9:.2f} GB of KV in HBM but only {self.store.hbm.capacity / 1e9:.2f} GB "
            f"is left after the weights; expected a larger GPU, more gpu.count or a smaller max_context_tokens")

    # ---- a prefill iteration: layer-wise preload pipeline (§3.2) ----------------------------
    def _prefill(self, batch, now):
        cost, L, rec, store = self.cost, self.L, self.rec, self.store
        if now >= rec.hbm_next_s:
            rec.sample_hbm(now, store.hbm)
        load_layer = compute_layer = head = loaded = 0.0
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
            compute_layer += cost.prefill_layer_s(job.computed, job.hit)
            head += cost.prefill_head_s(job.computed)
            rec.hit_tier[i] = code
            rec.bytes_loaded[i] = dram_b + ssd_b
            loaded += dram_b + ssd_b
        start = ready
        if ssd_bytes:  # direct SSD reads queue behind prefetches
            ssd_r = store.ssd_r
            if ssd_r.free_at > start:
                start = ssd_r.free_at
            bw = cost.ssd_read_bw(ssd_bytes / L)
            # a device whose writes are in flight reads slower (SharedDeviceLink): stretch the stage
            slow = (ssd_r.transfer(start, ssd_bytes, bw, L) - start) * bw / ssd_bytes
            for i, dram_chunk, ssd_chunk in ssd_jobs:
                load_j = cost.history_load_layer_s(dram_chunk, ssd_chunk, slow)
                load_layer += load_j
                rec.load_s[i] = load_j * L
        t = cost.prefill_iteration(load_layer, compute_layer, head, self.buffer_layers, self.layerwise).total_s
        if load_layer:
            store.h2d.charge(loaded)
        save = 0.0
        if store.on_host and not self.async_save:
            # synchronous saving: the new prompt KV is written back before decoding resumes
            prompt_bytes = sum(j.computed for j in batch) * self.kv_tok
            save = prompt_bytes / cost.d2h_bw(prompt_bytes / L)
            self.stall_save_s += save
            for j in batch:
                j.saved_prompt_bytes = j.computed * self.kv_tok
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
        rec.prefill_stall(self.n_running, wait + t + save, save)
        return wait + t + save

    def _after_prefill(self, batch, now):
        stall = 0.0
        for job in batch:
            if self.store.on_host and self.async_save:
                # asynchronous saving (§3.3): the prompt KV drains through D2H while decoding goes on
                prompt_bytes = job.computed * self.kv_tok
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
        cut = self.source.next_arrival_s() - now if not queued and B < self.max_batch else math.inf
        if queued and self.store.releases:
            r = self.store.releases[0][0] - now
            if r < cut:
                cut = r
        total, k = self.cost.decode_span(B, self.ctx_sum, kmax, cut)
        self.busy_decode_s += total
        # ITL: the span's iterations at their mean length (the cost model does not report its first)
        self.rec.decode_span(B, k, total / k, 0.0)
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
        self.sched.finished(job, ctx)
        self.source.reply_done(i, now, now + stall)
        return stall
