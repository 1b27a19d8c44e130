"""One serving replica as a SimPy process: job queue, continuous batching, and the KV hierarchy.

Follows CachedAttention (arXiv 2403.19708): §3.1 KV of past turns saved to a host DRAM / SSD
store instead of dropped; §3.2 layer-wise pre-loading through a read buffer; §3.3 asynchronous
saving through a write buffer; §3.4 scheduler-aware fetching (SSD -> DRAM for jobs inside the
queue's look-ahead window) and eviction; §3.5 KV saved without positional encoding, so a
truncated history stays reusable.

Events per turn are O(1): a prefill iteration is one timeout (its layer pipeline is closed form),
and decode runs in spans: between two changes of the running batch every iteration has the same
shape, so one timeout advances the whole span with a closed-form sum of iteration times.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from itertools import islice

import numpy as np

from sim.errors import KvsimError
from sim.eviction import victims
from sim.tiers import Entry, Link, SharedDeviceLink, Tier
from sim.trace import BLOCK_TOKENS
from sim.workload import reusable_block_keys

TIER_CODES = ("none", "miss", "hbm", "dram", "ssd")  # per-turn hit_tier, 'none' = nothing to reuse
NONE, MISS, HBM, DRAM, SSD = range(5)


class Job:
    __slots__ = ("i", "sid", "arrival", "keys", "hist", "prompt", "output", "ctx_in", "hit", "hit_entries",
                 "computed", "res_bytes", "done_iter", "ctx", "prefill_end", "save_end", "truncated",
                 "saved_prompt_bytes", "admitted", "blocks")

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


class Recorder:
    """Per-turn columns, filled by index (one row per turn). Python lists: scalar stores into
    numpy arrays cost several times more, and this is the simulator's hottest path."""

    COLS = ("arrival_s", "admit_s", "ttft_s", "prefill_start_s", "prefill_s", "load_s", "fetch_wait_s",
            "finish_s", "history_tokens", "hit_tokens", "computed_tokens", "bytes_loaded", "bytes_saved",
            "batch_size", "prompt_tokens", "output_tokens")

    def __init__(self, n):
        self.n = n
        nan = float("nan")
        for c in self.COLS:
            setattr(self, c, [nan] * n)
        self.hit_tier = [0] * n
        self.truncated = [False] * n

    def arrays(self) -> dict:
        out = {c: np.asarray(getattr(self, c), dtype=float) for c in self.COLS}
        out["hit_tier"] = np.asarray(self.hit_tier, dtype=np.int8)
        out["truncated"] = np.asarray(self.truncated, dtype=bool)
        return out


class Replica:
    def __init__(self, env, cfg, cost, workload, hbm_kv_bytes: float):
        self.env, self.cfg, self.cost, self.wl = env, cfg, cost, workload
        pol = cfg.policy
        self.kind = pol.kind
        self.store_on_host = pol.kind == "attentionstore"
        self.reuse = pol.kind != "recompute"
        self.shape = shape = cost.shape
        self.L = shape.layers
        self.kv_tok = shape.kv_bytes_per_token
        self.kv_tok_layer = shape.kv_bytes_per_token_layer
        self.window = shape.max_context_tokens
        self.layerwise = pol.layerwise_preload
        self.preload_overhead = cost.preload_layer_overhead_s()
        self.buffer_layers = pol.read_buffer_layers
        self.async_save = pol.async_save
        sch = cfg.scheduler
        self.max_batch, self.max_prefill_tokens, self.lookahead = sch.max_batch, sch.max_prefill_tokens, sch.lookahead_jobs
        self.fetch = pol.scheduler_aware_fetch and self.kind == "attentionstore"
        # scheduler-aware eviction is AttentionStore's (§3.4); the HBM-only prefix cache it is
        # compared with evicts by recency, as vLLM/SGLang do (FIFO stays selectable for ablations)
        self.aware = pol.eviction == "scheduler_aware" and self.kind == "attentionstore"
        self.decoupled = pol.truncation == "decoupled_pe"
        ra = pol.round_attention
        # Round Attention: layers above the watershed load and hold only the kept rounds' history
        self.ra_factor = ((ra.watershed_layer + (self.L - ra.watershed_layer) * ra.kept_fraction) / self.L
                          if ra.enabled else 1.0)
        recency = pol.eviction != "fifo"
        read_buffer = (self.buffer_layers * self.window * self.kv_tok_layer
                       if self.kind == "attentionstore" and self.layerwise else 0.0)
        self.hbm = Tier("hbm", hbm_kv_bytes - read_buffer, recency)
        store = self.kind == "attentionstore"
        self.dram = Tier("dram", cfg.host.dram_bytes if store else 0.0, recency)
        self.ssd = Tier("ssd", cfg.ssd.bytes if store else 0.0, recency)
        self.tier_code = {"hbm": HBM, "dram": DRAM, "ssd": SSD}
        self.index = {}  # key -> Entry (one tier per entry)
        self.h2d, self.d2h = Link("h2d"), Link("d2h")
        contention = cfg.ssd.contention or cost.ssd_contention() or "none"
        self.ssd_r, self.ssd_w = (SharedDeviceLink.pair("ssd_read", "ssd_write", contention) if contention != "none"
                                  else (Link("ssd_read"), Link("ssd_write")))
        self.queue = deque()
        self.new_in_window = []  # arrivals inside the look-ahead window, fetched after admission
        self.queue_version = 0  # bumped on every enqueue/dequeue: keys the cached look-ahead map
        self._prot, self._prot_version = None, -1
        self.arrivals = []  # heap (t, turn index)
        self.releases = []  # heap (t, seq, bytes): HBM freed when a write-back ends
        self.running = []  # heap (done_iter, seq, job)
        self.n_running = 0
        self.iter_count = 0
        self.ctx_sum = 0.0
        self.seq = 0
        self.sess_ctx = {}  # session -> context tokens after its last turn (post truncation)
        self.rec = Recorder(len(workload))
        # plain lists: numpy scalars read one at a time are slow and would leak into the clock
        self.w_session = list(workload.session)
        self.w_prompt = workload.prompt_tokens.tolist()
        self.w_output = workload.output_tokens.tolist()
        self.w_arrival = workload.arrival_s.tolist()
        self.w_think = workload.think_s.tolist()
        self.w_next = workload.next_turn.tolist()
        self.w_hashes = workload.prefix_hashes
        self.busy_prefill_s = 0.0
        self.busy_decode_s = 0.0
        self.stall_save_s = 0.0
        self.evictions = {"hbm": 0, "dram": 0, "ssd": 0}
        self.done = 0
        for i in workload.first_turns.tolist():
            heapq.heappush(self.arrivals, (float(workload.arrival_s[i]), i))
        self.proc = env.process(self.serve())

    # ---- the serving loop ------------------------------------------------------------------
    def serve(self):
        """The replica's own clock `now` runs the loop; SimPy's clock catches up at each yield.

        The replica is the only process and links are closed form, so nothing can happen inside an
        idle gap, a prefill or a decode span: an idle gap until the next arrival needs no event of its
        own, and a span and the save stall that follows it share one. `now` advances exactly as
        chained timeouts would (now + delay), so results do not depend on how steps are grouped.
        """
        env = self.env
        n = len(self.wl)
        arrivals, releases, queue = self.arrivals, self.releases, self.queue
        now = env.now
        while self.done < n:
            if arrivals and arrivals[0][0] <= now:
                self._take_arrivals(now)
            if releases and releases[0][0] <= now:
                self._take_releases(now)
            batch = self._admit(now) if queue else None
            if self.new_in_window:
                # fetch only for jobs that really wait: one admitted now loads layer-wise from SSD
                for job in self.new_in_window:
                    if not job.admitted:
                        self._prefetch(job, job.arrival)
                self.new_in_window.clear()
            if batch:
                dt = self._prefill(batch, now)
                t1 = now + dt
                stall = self._after_prefill(batch, t1)
                if stall == 0.0 and self.n_running and not queue and not (arrivals and arrivals[0][0] <= t1):
                    # nothing can join before decoding starts: the first decode span joins the prefill
                    span, k = self._decode_span(t1)
                    now = now + (dt + span)
                    stall = self._after_decode(k, now)
                else:
                    now = t1
                if stall > 0:
                    now = now + stall
                yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            if self.n_running:
                dt, k = self._decode_span(now)
                now = now + dt
                stall = self._after_decode(k, now)
                if stall > 0:
                    now = now + stall
                yield env.timeout(now - env.now if now > env.now else 0.0)
                continue
            nxt = self._next_wakeup()
            if nxt is None:
                job = queue[0]
                raise KvsimError(
                    f"{self.cfg.source}: gpu: turn {job.i} (session {job.sid}) needs "
                    f"{self._need_bytes(job) / 1e9:.2f} GB of KV in HBM but only {self.hbm.capacity / 1e9:.2f} GB "
                    f"is left after the weights; expected a larger GPU, more gpu.count or a smaller max_context_tokens")
            if nxt > now:  # idle until the next arrival (or write-back end)
                now = now + (nxt - now)

    def _next_wakeup(self):
        t = math.inf
        if self.arrivals:
            t = self.arrivals[0][0]
        if self.releases and self.queue:
            t = min(t, self.releases[0][0])
        return None if t == math.inf else t

    def _take_arrivals(self, now):
        arr = self.arrivals
        while arr and arr[0][0] <= now:
            t, i = heapq.heappop(arr)
            job = self._make_job(i, t)
            self.queue.append(job)
            self.queue_version += 1
            if self.fetch and len(self.queue) <= self.lookahead:
                self.new_in_window.append(job)

    def _take_releases(self, now):
        rel = self.releases
        while rel and rel[0][0] <= now:
            _, _, nbytes = heapq.heappop(rel)
            self.hbm.reserved -= nbytes

    # ---- a turn becomes a job: truncation and reuse keys ----------------------------------
    def _make_job(self, i, t):
        sid = self.w_session[i]
        prompt = self.w_prompt[i]
        output = self.w_output[i]
        hashes = self.w_hashes[i]
        W = self.window
        output = min(output, W - 1)
        if hashes is not None:
            # Mooncake-style request: reuse is of the input's own leading blocks, from any request
            trunc = prompt + output > W
            prompt = min(prompt, W - output)
            return Job(i, sid, t, reusable_block_keys(hashes, prompt), 0, prompt, output, trunc, blocks=True)
        hist = self.sess_ctx.get(sid, 0)
        prompt = min(prompt, W - output)
        kept = min(hist, W - prompt - output)
        # history overflowing the window: drop the oldest tokens (CachedAttention §3.5)
        # a history truncated to nothing has nothing to reuse
        job = Job(i, sid, t, (sid,) if kept else (), kept, prompt, output, kept < hist)
        return job

    # ---- scheduler-aware fetching (§3.4) ------------------------------------------------------
    def _prefetch(self, job, now):
        prot = None
        for key in job.keys:
            e = self.index.get(key)
            if e is None:
                break
            if e.tier is self.ssd and not e.users:
                if prot is None:
                    prot = self._protected()
                pos = prot.get(key, math.inf) if prot is not None else -1
                if not self._make_room(self.dram, e.nbytes, now, pos, prot):
                    return
                end = self.ssd_r.transfer(now, e.nbytes, self.cost.ssd_read_bw(e.nbytes / self.L), self.L)
                self.ssd.remove(e)
                self.dram.add(e)
                e.ready_at = end

    def _protected(self):
        """Keys the look-ahead window will read -> queue position; rebuilt only when the queue changed."""
        if not self.aware:
            return None
        if self._prot_version != self.queue_version:
            prot = {}
            for pos, job in enumerate(islice(self.queue, self.lookahead)):
                for key in job.keys:
                    prot.setdefault(key, pos)
            self._prot, self._prot_version = prot, self.queue_version
        return self._prot

    def _make_room(self, tier, nbytes, now, after_pos=math.inf, prot=None) -> bool:
        """Evict from `tier` until `nbytes` fit: DRAM victims move to SSD, SSD and HBM victims are dropped.

        By default the KV of queued jobs is never given up (a save spills to SSD instead);
        a prefetch passes its own queue position so only jobs behind it can lose theirs.
        """
        if tier.free >= nbytes:
            return True
        if nbytes > tier.capacity or not tier.entries:
            return False
        if prot is None:
            prot = self._protected()
        for e in victims(tier, nbytes, prot, after_pos):
            self.evictions[tier.name] += 1
            tier.remove(e)
            if tier is self.dram and self.ssd.capacity >= e.nbytes and self._make_room(self.ssd, e.nbytes, now):
                self.ssd_w.transfer(now, e.nbytes, self.cost.ssd_write_bw(e.nbytes / self.L), self.L)
                self.ssd.add(e)
            else:
                del self.index[e.key]
        return tier.free >= nbytes

    # ---- admission: FCFS, bounded by batch size, prefill tokens and HBM ----------------------
    def _plan(self, job, now):
        """Find the reusable KV and what must be computed and held in HBM."""
        hit, entries = 0, []
        if self.reuse and job.keys:
            if not job.blocks:  # a session's history: one entry
                e = self.index.get(job.sid)
                if e is not None:
                    if job.truncated and not self.decoupled:
                        # positions baked into the saved KV are now wrong: it must be recomputed
                        self._drop(e)
                    else:
                        hit = min(e.tokens, job.hist)
                        entries.append(e)
            else:  # prefix blocks
                for key in job.keys:
                    e = self.index.get(key)
                    if e is None:
                        break
                    entries.append(e)
                hit = len(entries) * BLOCK_TOKENS
        job.hit, job.hit_entries = hit, entries
        job.computed = job.ctx_in - hit
        in_hbm = 0.0
        for e in entries:
            if e.tier is self.hbm:
                in_hbm += e.nbytes
        full = (job.ctx_in + job.output) * self.kv_tok
        if self.ra_factor != 1.0 and hit:
            full -= hit * self.kv_tok * (1.0 - self.ra_factor)
        job.res_bytes = full - in_hbm

    def _need_bytes(self, job):
        self._plan(job, self.env.now)
        return job.res_bytes

    def _admit(self, now):
        q = self.queue
        if not q:
            return None
        room = self.max_batch - self.n_running
        batch, tokens = [], 0
        while q and room > 0:
            job = q[0]
            self._plan(job, now)
            if batch and tokens + job.computed > self.max_prefill_tokens:
                break
            for e in job.hit_entries:  # pin before evicting so the hit survives
                e.users += 1
            if self.hbm.free < job.res_bytes and not self._make_room(self.hbm, job.res_bytes, now):
                for e in job.hit_entries:
                    e.users -= 1
                break
            q.popleft()
            self.queue_version += 1
            job.admitted = True
            self.hbm.reserved += job.res_bytes
            self.hbm._peak()
            batch.append(job)
            tokens += job.computed
            room -= 1
            for e in job.hit_entries:
                e.tier.touch(e)
            W = self.lookahead
            if self.fetch and len(q) >= W > 0:
                self._prefetch(q[W - 1], now)
        return batch

    # ---- a prefill iteration: layer-wise preload pipeline (§3.2) ----------------------------
    def _prefill(self, batch, now):
        cost, L, rec = self.cost, self.L, self.rec
        hbm, dram = self.hbm, self.dram
        load_layer = compute_layer = head = loaded = 0.0
        ready = now
        ssd_bytes = 0.0
        ssd_jobs = []
        for job in batch:
            i = job.i
            dram_b = ssd_b = 0.0
            code = MISS if job.keys else NONE
            for e in job.hit_entries:
                t = e.tier
                if t is hbm:
                    if code < HBM:
                        code = HBM
                    continue
                b = e.nbytes if job.blocks else e.nbytes * (job.hit / e.tokens)
                if self.ra_factor != 1.0:
                    b *= self.ra_factor
                if t is dram:
                    dram_b += b
                    if code < DRAM:
                        code = DRAM
                    if e.ready_at > ready:
                        ready = e.ready_at
                else:
                    ssd_b += b
                    code = SSD
            load_j = 0.0
            if dram_b:
                chunk = dram_b / L
                load_j = chunk / cost.h2d_bw(chunk)
            if ssd_b:
                # its load time is known once the SSD says how fast it reads now (below)
                ssd_jobs.append((i, ssd_b / L, load_j))
                ssd_bytes += ssd_b
            elif load_j:
                load_j += self.preload_overhead
                load_layer += load_j
            rec.load_s[i] = load_j * L  # an SSD hit's is rewritten below
            compute_layer += cost.prefill_layer_s(job.computed, job.hit)
            head += cost.prefill_head_s(job.computed)
            rec.hit_tier[i] = code
            rec.bytes_loaded[i] = dram_b + ssd_b
            loaded += dram_b + ssd_b
        start = ready
        if ssd_bytes:  # direct SSD reads queue behind prefetches
            if self.ssd_r.free_at > start:
                start = self.ssd_r.free_at
            bw = cost.ssd_read_bw(ssd_bytes / L)
            # a device whose writes are in flight reads slower (SharedDeviceLink): stretch the stage
            slow = (self.ssd_r.transfer(start, ssd_bytes, bw, L) - start) * bw / ssd_bytes
            for i, chunk, load_j in ssd_jobs:
                # SSD -> DRAM staging -> HBM, layer by layer: the slower of the two stages paces it
                load_j += chunk / min(cost.ssd_read_bw(chunk) / slow, cost.h2d_bw(chunk)) + self.preload_overhead
                load_layer += load_j
                rec.load_s[i] = load_j * L
        t = cost.prefill_iteration_s(load_layer, compute_layer, head, self.buffer_layers, self.layerwise)
        if load_layer:
            self.h2d.busy_s += load_layer * L
            self.h2d.bytes_moved += loaded
        save = 0.0
        if self.store_on_host and not self.async_save:
            # synchronous saving: the new prompt KV is written back before decoding resumes
            nb = sum(j.computed for j in batch) * self.kv_tok
            save = nb / cost.d2h_bw(nb / L)
            self.stall_save_s += save
            for j in batch:
                j.saved_prompt_bytes = j.computed * self.kv_tok
            self.d2h.busy_s += save
            self.d2h.bytes_moved += nb
        wait = start - now
        self.busy_prefill_s += t
        ttft_end = start + t
        nb = len(batch)
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
            rec.truncated[i] = job.truncated
            rec.batch_size[i] = nb
        return wait + t + save

    def _after_prefill(self, batch, now):
        stall = 0.0
        for job in batch:
            if self.store_on_host and self.async_save:
                # asynchronous saving (§3.3): the prompt KV drains through D2H while decoding goes on
                nb = job.computed * self.kv_tok
                job.save_end = self.d2h.transfer(now, nb, self.cost.d2h_bw(nb / self.L))
                job.saved_prompt_bytes = nb
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
        return stall

    # ---- decode spans -------------------------------------------------------------------
    def _decode_span(self, now):
        B = self.n_running
        S = self.ctx_sum
        kmax = self.running[0][0] - self.iter_count
        step = self.cost.decode_step_s
        a = step(B, S)
        # iteration times grow linearly with context inside a span: t_j = a + d j
        d = (step(B, S + B * (kmax - 1)) - a) / (kmax - 1) if kmax > 1 else 0.0
        k = kmax
        total = kmax * a + d * kmax * (kmax - 1) * 0.5
        # an arrival changes the batch only if it can be admitted at once: not while the batch is
        # full, nor behind a queued job (FCFS); it is then taken at the span's end, at its own time
        cut = self.arrivals[0][0] - now if self.arrivals and not self.queue and B < self.max_batch else math.inf
        if self.queue and self.releases:
            r = self.releases[0][0] - now
            if r < cut:
                cut = r
        if cut < total:
            if cut < 0.0:
                cut = 0.0
            # fewest iterations whose summed time reaches the cut: k a + d k(k-1)/2 >= cut
            if d > 1e-15:
                b = a - d * 0.5
                k = int(math.ceil((math.sqrt(b * b + 2.0 * d * cut) - b) / d))
            else:
                k = int(math.ceil(cut / a)) if a > 0 else 1
            if k < 1:
                k = 1
            elif k > kmax:
                k = kmax
            total = k * a + d * k * (k - 1) * 0.5
        self.busy_decode_s += total
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
        return stall

    # ---- the end of a turn: save (§3.3) and free HBM --------------------------------------
    def _finish(self, job, now):
        i = job.i
        rec = self.rec
        rec.finish_s[i] = now
        for e in job.hit_entries:
            e.users -= 1
        ctx = job.ctx_in + job.output
        stall = 0.0
        release_at = now
        if self.store_on_host:
            saved = self._save_to_host(job, ctx, now)
            rest = saved - job.saved_prompt_bytes
            if rest < 0:
                rest = 0.0
            if self.async_save:
                end = self.d2h.transfer(now, rest, self.cost.d2h_bw(rest / self.L)) if rest else job.save_end
                release_at = end if end > job.save_end else job.save_end
            else:
                stall = rest / self.cost.d2h_bw(max(rest, 1.0) / self.L)
                self.stall_save_s += stall
                self.d2h.busy_s += stall
                self.d2h.bytes_moved += rest
                release_at = now + stall
            rec.bytes_saved[i] = saved
            self.hbm.reserved -= job.res_bytes
            if release_at > now:
                # the write buffer holds the KV until the write-back ends
                self.hbm.reserved += job.res_bytes
                self.seq += 1
                heapq.heappush(self.releases, (release_at, self.seq, job.res_bytes))
        elif self.kind == "hbm_prefix":
            self.hbm.reserved -= job.res_bytes
            self._keep_in_hbm(job, ctx, now)
            rec.bytes_saved[i] = 0.0
        else:
            self.hbm.reserved -= job.res_bytes
            rec.bytes_saved[i] = 0.0
        if not job.blocks:
            self.sess_ctx[job.sid] = ctx
        self.done += 1
        nxt = self.w_next[i]
        if nxt >= 0:
            t = self.w_arrival[nxt]
            if t != t:  # NaN: the user thinks after reading the reply
                t = now + stall + self.w_think[nxt]
            heapq.heappush(self.arrivals, (t if t > now else now, nxt))
        return stall

    def _drop(self, e):
        e.tier.remove(e)
        del self.index[e.key]

    def _store(self, key, tokens, nbytes, tier, now, ready_at):
        """Put (or grow) an entry in `tier`; False if it cannot be made to fit."""
        e = self.index.get(key)
        if e is not None and e.tier is tier:
            delta = nbytes - e.nbytes
            e.users += 1  # do not evict the entry we are growing
            ok = delta <= 0 or self._make_room(tier, delta, now)
            e.users -= 1
            if not ok:
                self._drop(e)
                return False
            tier.grow(e, tokens, nbytes)
            tier.touch(e)
            e.ready_at = max(e.ready_at, ready_at)
            return True
        if e is not None:
            self._drop(e)
        if not self._make_room(tier, nbytes, now):
            return False
        e = Entry(key, tokens, nbytes, tier, ready_at)
        tier.add(e)
        self.index[key] = e
        return True

    def _save_to_host(self, job, ctx, now) -> float:
        """Write the turn's new KV to DRAM (spilling to SSD if DRAM cannot hold it); return bytes written."""
        if job.blocks:  # prefix blocks of the input
            written = 0.0
            nb = BLOCK_TOKENS * self.kv_tok
            hashes = self.w_hashes[job.i]
            for key in hashes[: job.prompt // BLOCK_TOKENS]:
                e = self.index.get(key)
                if e is not None:
                    e.tier.touch(e)
                    continue
                if self._store(key, BLOCK_TOKENS, nb, self.dram, now, now) or \
                        self._store(key, BLOCK_TOKENS, nb, self.ssd, now, now):
                    written += nb
            return written
        e = self.index.get(job.sid)
        nbytes = ctx * self.kv_tok
        if e is not None and e.tier is self.dram and job.hit:
            new = (ctx - job.hit) * self.kv_tok  # the reused part is already on the host
            dram = self.dram
            if dram.free >= nbytes - e.nbytes:
                dram.grow(e, ctx, nbytes)
                dram.touch(e)
                if now > e.ready_at:
                    e.ready_at = now
                return new
        else:
            new = nbytes
        # a history already on SSD is appended to there: only the turn's new KV is written
        on_ssd = e is not None and e.tier is self.ssd and job.hit
        if self._store(job.sid, ctx, nbytes, self.dram, now, now):
            return new
        if self.ssd.capacity and self._store(job.sid, ctx, nbytes, self.ssd, now, now):
            written = (ctx - job.hit) * self.kv_tok if on_ssd else nbytes
            self.ssd_w.transfer(now, written, self.cost.ssd_write_bw(written / self.L), self.L)
            return written
        return 0.0

    def _keep_in_hbm(self, job, ctx, now):
        """Prefix caching in spare HBM (vLLM/SGLang-like): the finished KV stays, LRU-evicted."""
        if job.blocks:
            nb = BLOCK_TOKENS * self.kv_tok
            for key in self.w_hashes[job.i][: job.prompt // BLOCK_TOKENS]:
                e = self.index.get(key)
                if e is not None:
                    e.tier.touch(e)
                else:
                    self._store(key, BLOCK_TOKENS, nb, self.hbm, now, now)
            return
        self._store(job.sid, ctx, ctx * self.kv_tok, self.hbm, now, now)
