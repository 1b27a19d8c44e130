"""The real executor: serves multi-turn sessions on one GPU with reused KV from HBM, DRAM or SSD.

What it models (CachedAttention, arXiv 2403.19708):
- §3.1: a session's KV is kept between turns in a tier (HBM, host DRAM, local SSD), or dropped and
  recomputed (the baseline: prefill the whole history again).
- §3.2 layer-wise pre-loading: the history KV of layer i is copied to HBM on a side stream; one CUDA
  event per layer gates layer i's attention, so loading layer i+1 overlaps computing layer i. A read
  buffer of N layers bounds how far loading runs ahead: the load of layer i may start only when layer
  i-N's compute has ended (the simulator's max-plus recursion). "Sync" loading copies every layer first
  and computes after (L * load + compute).
- §3.3 asynchronous saving: the new KV of a turn goes back to its tier on another stream while the
  turn decodes (prompt KV) and while the next turn runs (reply KV).

Scheduling is deliberately plain: one turn at a time, first come first served (the simulator's
`scheduler.max_batch: 1`); a turn waits for its arrival, loads, prefills, then decodes its reply.

SSD path: a reader thread reads layer i's history from the session's file (O_DIRECT) into slot i % N of
a pinned bounce buffer of N layers, which is reused once the copy of layer i-N out of it has finished;
the main thread then issues that slot's host-to-device copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import heapq
import math
import threading
import time
import zlib
from dataclasses import dataclass, field

import pandas as pd
import torch

from gpu import model as M
from gpu.decode_graph import DECODE_BUCKET, DecodeGraphs
from gpu.prefill_graph import PrefillGraphs
from gpu.kvstore import ALIGN, DiskStore, HostArena, aligned_host_bytes, layer_view, unpin
from gpu.plans import ServePlan
from sim.units import MS

@dataclass
class Session:
    sid: str
    capacity: int                           # tokens of KV this session may hold (known from its trace)
    tokens: list[int] = field(default_factory=list)   # all tokens so far (prompts + replies)
    kv_tokens: int = 0                      # tokens whose KV sits in the session's tier
    store: object = None                    # hbm: device tensor; dram: host view; ssd: DiskFile
    saved: object = None                    # cuda event (dram) or threading.Event (ssd) of the last save


@dataclass
class TurnTiming:
    """What one turn measured. Wall times in seconds from the executor's clock origin; GPU spans in ms."""
    session_id: str
    turn: int
    arrival_s: float
    start_s: float
    first_token_s: float
    end_s: float
    history_tokens: int
    new_tokens: int
    output_tokens: int
    load_ms: float          # first layer's load start -> last layer's load end (GPU events)
    load_busy_ms: float     # sum of the per-layer copy times
    compute_ms: float       # sum of the per-layer compute times (after each layer's gate opened)
    prefill_span_ms: float  # turn's first GPU op -> logits of the first token (GPU events)
    ssd_read_ms: float      # sum of the reader thread's per-layer read times (wall clock)
    decode_ms: float
    first_token: int
    issue_ms: float = 0.0   # host: turn start -> last prefill layer handed to the GPU (launch-bound check)
    captures: int = 0       # prefill graphs captured inside this turn (0 once the shapes were prepared)
    sm_clock_mhz: float = float("nan")   # SM clock just before the turn (only when asked for)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s


class _Events:
    """A fixed pool of timing events (creating events per turn would cost host time inside TTFT)."""

    def __init__(self, n: int, cuda: bool):
        self.cuda = cuda
        self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(n)] if cuda else [None] * n

    def record(self, i, stream=None):
        if self.cuda:
            self.ev[i].record(stream)

    def ms(self, a, b) -> float:
        return self.ev[a].elapsed_time(self.ev[b]) if self.cuda else 0.0


class Executor:
    """Serves turns of sessions, one at a time, on `model` following `plan`."""

    def __init__(self, model: M.Decoder, plan: ServePlan, max_ctx: int, max_new: int,
                 host_bytes: int = 0, ssd_dir=None, poison: bool = False, arena: HostArena | None = None,
                 decode: str = "graph", graph_bucket: int = DECODE_BUCKET, detail_events: bool = True):
        self.model, self.plan, self.max_ctx, self.max_new = model, plan, max_ctx, max_new
        s = model.shape
        self.L = s.layers
        self.dev = model.device
        self.cuda = self.dev.type == "cuda"
        self.poison = poison
        # Per-layer start events (load and compute spans) are instrumentation: each costs host time
        # inside the prefill. Trace runs turn them off; gating events are always recorded.
        self.detail = detail_events
        self.kv_shape = (s.kv_heads, s.head_dim)
        if s.dtype_bytes != model.dtype.itemsize:
            raise ValueError(f"{s.name}: shape says {s.dtype_bytes} bytes per element, the weights are {model.dtype}")
        self.token_bytes = s.kv_bytes_per_token_layer
        # Prefill runs as graphs of padded shapes (gpu.prefill_graph): caches get room for the padding.
        self.pgraph = PrefillGraphs(model, max_ctx if plan.tier == "recompute" else max_new)
        self.ctx_alloc = -(-self.pgraph.cache_tokens(max_ctx) // graph_bucket) * graph_bucket
        if model.rope_cos.shape[0] < self.ctx_alloc:
            raise ValueError(f"the model's RoPE tables hold {model.rope_cos.shape[0]} positions; padded caches "
                             f"need {self.ctx_alloc}: build it with max_pos >= {self.ctx_alloc}")
        # Two working caches, used by turns in alternation, so that a turn's reply KV can be saved
        # while the next turn already loads into the other one.
        # Zeroed, not empty: graphed decode and padded prefill attend over whole buckets with the tail
        # masked, and masked garbage that happens to be NaN would still poison the weighted sum.
        self.work = [torch.zeros((self.L, 1, self.ctx_alloc, 2, s.kv_heads, s.head_dim), device=self.dev,
                                 dtype=model.dtype) for _ in range(2)]
        if decode not in ("graph", "eager"):
            raise ValueError(f"decode {decode!r}, expected 'graph' or 'eager'")
        # HBM hits decode in the session's own cache, which no graph was captured for: eager there.
        self.dgraph = (DecodeGraphs(model, self.work, bucket=graph_bucket)
                       if decode == "graph" and plan.tier != "hbm" else None)
        self.work_free = [None, None]   # event: last save out of this working cache done
        self.turn_no = 0
        if self.cuda:
            self.load_stream = torch.cuda.Stream()
            self.save_stream = torch.cuda.Stream()
        else:
            self.load_stream = self.save_stream = None
        n_ev = 4 * self.L + 4
        self.events = _Events(n_ev, self.cuda)
        self._own = []      # host buffers this executor pinned, unpinned by close()
        # A caller serving several runs passes one arena: pinning tens of GB once, not once per run.
        self.arena = None
        if plan.tier == "dram":
            self.arena = arena if arena is not None else HostArena(host_bytes, pinned=self.cuda)
            self.arena.used = 0
            if arena is None:
                self._own.append(self.arena.raw)
        self.disk = None
        if plan.tier == "ssd":
            self.disk = DiskStore(ssd_dir, self.L, self.token_bytes)
            n = plan.read_buffer_layers
            raw = aligned_host_bytes(n * max_ctx * self.token_bytes, pinned=self.cuda)
            self.bounce = layer_view(raw, n, max_ctx, self.kv_shape, model.dtype)
            self.bounce_free = [None] * n        # event: copy out of slot done
            stage_raw = [aligned_host_bytes(self.L * max_new * self.token_bytes, self.cuda) for _ in range(2)]
            self.staging = [layer_view(r, self.L, max_new, self.kv_shape, model.dtype) for r in stage_raw]
            self._own += [raw] + stage_raw
            self.staging_free = [threading.Event(), threading.Event()]
            for e in self.staging_free:
                e.set()
        self.sessions: dict[str, Session] = {}

    # ------------------------------------------------------------------ sessions
    def open_session(self, sid: str, capacity: int) -> Session:
        if capacity > self.max_ctx:
            raise ValueError(f"session {sid}: capacity {capacity} > max_ctx {self.max_ctx}")
        sess = Session(sid, capacity)
        tier = self.plan.tier
        if tier == "hbm":
            # room for the padded tail of a prefill, and zeroed for the reason the working caches are
            sess.store = torch.zeros((self.L, 1, self.pgraph.cache_tokens(capacity), 2, *self.kv_shape),
                                     device=self.dev, dtype=self.model.dtype)
        elif tier == "dram":
            sess.store = self.arena.reserve(self.L, capacity, self.kv_shape, self.model.dtype)
        elif tier == "ssd":
            sess.store = self.disk.create(sid, capacity)
        self.sessions[sid] = sess
        return sess

    def prepare_trace(self, trace: pd.DataFrame):
        """Capture the prefill graphs every turn of `trace` will need (before its clock starts).

        A serving engine captures its graphs at start-up; capturing inside a turn would put seconds of
        host work into that turn's TTFT. Sessions must be open (HBM sessions prefill in their own store).
        """
        for sid, g in trace.groupby("session_id", sort=False):
            g = g.sort_values("turn")
            for hist, n in turn_shapes(self.plan.tier, g.prompt_tokens, g.output_tokens):
                self.prepare_shape(sid, hist, n)

    def prepare_shape(self, sid: str, hist: int, n: int):
        """Capture the prefill graphs of one turn shape of session `sid` (both working caches: a
        turn's cache depends on the parity of the turns before it)."""
        caches = [self.sessions[sid].store] if self.plan.tier == "hbm" else self.work
        nb, kb = self.pgraph.shape_for(n, hist)
        for c in caches:
            self.pgraph.prepare(c, nb, kb, start=hist)

    def close(self):
        self.drain()
        if self.disk is not None:
            self.disk.close()
        for t in self._own:
            unpin(t)
        self._own = []

    # ------------------------------------------------------------------ one turn
    def run_turn(self, sid: str, turn: int, prompt_ids: list[int], output_tokens: int,
                 arrival_s: float, clock0: float, fault_skip_layer: int | None = None) -> TurnTiming:
        """Serve one turn now: load history, prefill the prompt, decode `output_tokens` - 1 steps.

        The first reply token comes from the prefill; the last reply token's KV is computed by the next
        turn (as in chat serving, where it is part of the next prompt's template), so the next turn's
        new tokens are its prompt plus that one token. `fault_skip_layer` skips one layer's load: the
        tests use it to prove that a missing load is caught.
        """
        sess = self.sessions[sid]
        plan, L, ev = self.plan, self.L, self.events
        start_s = time.perf_counter() - clock0
        if plan.tier == "recompute":
            new = sess.tokens + list(prompt_ids)
            hist = 0
        else:
            new = sess.tokens[sess.kv_tokens:] + list(prompt_ids)
            hist = sess.kv_tokens
        n = len(new)
        total = hist + n + max(output_tokens - 1, 0)
        if total > (sess.capacity if plan.tier != "recompute" else self.max_ctx) or total > self.max_ctx:
            raise ValueError(f"session {sid} turn {turn}: {total} tokens exceed its capacity")
        if plan.tier != "recompute" and n + output_tokens > self.max_new:
            raise ValueError(f"session {sid} turn {turn}: {n} new tokens exceed max_new {self.max_new}")
        main = torch.cuda.current_stream() if self.cuda else None

        # Working cache: the session's own HBM store, or the working cache this turn's parity picks.
        if plan.tier == "hbm":
            W, wi = sess.store, None
        else:
            wi = self.turn_no % 2
            W = self.work[wi]
            if self.cuda and self.work_free[wi] is not None:
                main.wait_event(self.work_free[wi])
                self.load_stream.wait_event(self.work_free[wi])
        self.turn_no += 1
        if self.poison:
            # NaN where this turn's history must land: a layer whose history was never loaded poisons
            # the logits. (An HBM hit keeps its history in place: there, poison where the new tokens'
            # KV must land; not past it, where padded attention reads masked keys.)
            if plan.tier == "hbm":
                W[:, :, sess.kv_tokens:sess.kv_tokens + n].fill_(float("nan"))
            else:
                W[:, :, :sess.kv_tokens].fill_(float("nan"))
            if plan.tier == "ssd":
                self.bounce.fill_(float("nan"))

        ids = torch.tensor([new], dtype=torch.long).to(self.dev, non_blocking=False)
        captures0 = self.pgraph.captures
        self.pgraph.prepare(W, *self.pgraph.shape_for(n, hist), start=hist)   # no-op once prepared
        E_START, E_HEAD = 4 * L, 4 * L + 1   # event slots: [0,L) load start, [L,2L) load end,
        ev.record(E_START, main)             # [2L,3L) compute start, [3L,4L) compute end

        loads = hist > 0 and plan.tier in ("dram", "ssd")
        reader = _SsdReader(self, sess, hist) if loads and plan.tier == "ssd" else None
        if self.cuda and loads and sess.saved is not None and plan.tier == "dram":
            self.load_stream.wait_event(sess.saved)   # last turn's save of this session must have landed

        def issue_load(i):
            if fault_skip_layer == i:
                src = None
            elif plan.tier == "dram":
                src = sess.store[i, :hist]
            else:
                src = reader.slot(i)
            ctx = torch.cuda.stream(self.load_stream) if self.cuda else _nullctx()
            with ctx:
                if self.cuda and plan.overlap and i >= plan.read_buffer_layers:
                    self.load_stream.wait_event(ev.ev[3 * L + i - plan.read_buffer_layers])
                if self.detail:
                    ev.record(i, self.load_stream)
                if src is not None:
                    W[i, 0, :hist].copy_(src, non_blocking=True)
                ev.record(L + i, self.load_stream)
            if reader is not None:
                reader.issued(i, ev.ev[L + i])

        nxt = 0

        def pump(upto: int, block: bool):
            # Issue loads in layer order up to layer `upto` (exclusive). Without `block`, stop at the
            # first SSD layer the reader has not finished, so the CPU never stalls ahead of compute.
            nonlocal nxt
            while nxt < min(upto, L):
                if not block and reader is not None and not reader.ready[nxt].is_set():
                    break
                issue_load(nxt)
                nxt += 1

        self.pgraph.begin(ids, hist, W)
        N = plan.read_buffer_layers
        if loads and not plan.overlap:
            pump(L, block=True)
            if self.cuda:
                main.wait_stream(self.load_stream)
        elif loads:
            pump(N, block=False)
        for i in range(L):
            if loads and plan.overlap:
                pump(i + 1, block=True)
                if self.cuda:
                    main.wait_event(ev.ev[L + i])
            if self.detail:
                ev.record(2 * L + i, main)
            self.pgraph.layer(i)
            if self.detail or (loads and plan.overlap and i < L - N):   # the latter gate loads i + N
                ev.record(3 * L + i, main)
            if loads and plan.overlap:
                pump(i + 1 + N, block=False)
        issue_ms = (time.perf_counter() - clock0 - start_s) / MS
        logits, tok = self.pgraph.end()
        ev.record(E_HEAD, main)
        self.last_logits = logits
        first_token = int(tok.item())     # the host needs the token to stream it: this is the TTFT point
        first_token_s = time.perf_counter() - clock0
        if reader is not None:
            reader.join()

        # The decode steps are issued first: the GPU decodes while the host issues the saves and reads
        # this turn's timings, so neither adds host time between the first token and the next turn.
        t_dec = time.perf_counter()
        out = [first_token]
        pos = hist + n
        toks = None
        if output_tokens > 1:
            toks = torch.empty(output_tokens - 1, dtype=torch.long, device=self.dev)
            if self.dgraph is not None:
                self.dgraph.cur.copy_(tok.view(1, 1))
                for j in range(output_tokens - 1):
                    cur = self.dgraph.step(wi, pos)
                    pos += 1
                    toks[j] = cur[0, 0]
            else:
                cur = tok.view(1, 1)
                for j in range(output_tokens - 1):
                    cur = M.decode_step(self.model, cur, W, pos)
                    pos += 1
                    toks[j] = cur[0, 0]
        if plan.tier in ("dram", "ssd"):
            # prompt KV goes back as soon as the prefill is done, overlapping the decode (§3.3); the
            # reply KV (all but its last token, see docstring) once the decode is done, overlapping
            # the next turn
            self._save(sess, W, wi, hist, hist + n, part="prompt", after=ev.ev[E_HEAD] if self.cuda else None)
            self._save(sess, W, wi, hist + n, pos, part="reply")
        if self.cuda:      # the prefill has ended (its token is on the host): its events are complete
            span = ev.ms(E_START, E_HEAD)
            if self.detail:
                load_ms = ev.ms(0, 2 * L - 1) if loads else 0.0
                load_busy = sum(ev.ms(i, L + i) for i in range(L)) if loads else 0.0
                comp = sum(ev.ms(2 * L + i, 3 * L + i) for i in range(L))
            else:
                load_ms = load_busy = comp = float("nan")
        else:
            load_ms = load_busy = comp = span = 0.0
        if toks is not None:
            out += toks.tolist()           # synchronises: the reply is complete
        end_s = time.perf_counter() - clock0
        decode_ms = (time.perf_counter() - t_dec) / MS
        if plan.tier in ("dram", "ssd") and not plan.async_save:
            self.wait_saved(sess)
        sess.tokens = sess.tokens + list(prompt_ids) + out
        sess.kv_tokens = pos if plan.tier != "recompute" else 0

        return TurnTiming(sid, turn, arrival_s, start_s, first_token_s, end_s, hist, n, output_tokens,
                          load_ms, load_busy, comp, span, reader.read_ms if reader else 0.0, decode_ms,
                          first_token, issue_ms, captures=self.pgraph.captures - captures0)

    # ------------------------------------------------------------------ saving
    def _save(self, sess: Session, W, wi, a: int, b: int, part: str, after=None):
        """Copy KV tokens [a, b) of every layer from HBM back to the session's tier, asynchronously,
        once the main stream reaches event `after` (default: all the main stream's work so far)."""
        L = self.L

        def wait_for_source():
            if after is not None:
                self.save_stream.wait_event(after)
            else:
                self.save_stream.wait_stream(torch.cuda.current_stream())
        if self.plan.tier == "dram":
            if self.cuda:
                wait_for_source()
                with torch.cuda.stream(self.save_stream):
                    for i in range(L):
                        sess.store[i, a:b].copy_(W[i, 0, a:b], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self.save_stream)
                sess.saved = done
                self.work_free[wi] = done
            else:
                for i in range(L):
                    sess.store[i, a:b].copy_(W[i, 0, a:b])
            return
        # SSD: device -> pinned staging (per working cache), then a writer thread -> file.
        stage = self.staging[wi]
        if part == "prompt":
            self.staging_free[wi].wait()      # the writer of the turn before last must be done with it
            self.staging_free[wi].clear()
            self._stage_from = a
        base = self._stage_from
        if self.cuda:
            wait_for_source()
            with torch.cuda.stream(self.save_stream):
                for i in range(L):
                    stage[i, a - base:b - base].copy_(W[i, 0, a:b], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.save_stream)
            self.work_free[wi] = done
        else:
            for i in range(L):
                stage[i, a - base:b - base].copy_(W[i, 0, a:b])
            done = None
        if part == "reply":
            flag = threading.Event()
            sess.saved = flag
            f, disk, free = sess.store, self.disk, self.staging_free[wi]

            def write(start=base, end=b):
                if done is not None:
                    done.synchronize()
                for i in range(L):
                    disk.write_layer(f, i, start, stage[i, :end - start])
                disk.finish_writes(f)
                flag.set()
                free.set()

            threading.Thread(target=write, daemon=True).start()

    def wait_saved(self, sess: Session):
        """Wait until the last save of `sess` has landed in its tier."""
        if isinstance(sess.saved, threading.Event):
            sess.saved.wait()
        elif sess.saved is not None:
            sess.saved.synchronize()

    def drain(self):
        """Wait for every outstanding save (end of a run)."""
        for s in self.sessions.values():
            self.wait_saved(s)
        if self.cuda:
            torch.cuda.synchronize()


class _SsdReader:
    """Reads a session's history, layer by layer, into the N slots of the pinned bounce buffer."""

    def __init__(self, ex: Executor, sess: Session, hist: int):
        self.ex, self.sess, self.hist = ex, sess, hist
        L = ex.L
        self.ready = [threading.Event() for _ in range(L)]
        self.copied = [threading.Event() for _ in range(L)]
        self.copy_ev = [None] * L
        self.read_ms = 0.0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        ex, N = self.ex, self.ex.plan.read_buffer_layers
        try:
            if isinstance(self.sess.saved, threading.Event):
                self.sess.saved.wait()          # the last turn's write of this session must be on disk
            for i in range(ex.L):
                slot = i % N
                if i >= N:                      # slot still being copied out for layer i - N?
                    self.copied[i - N].wait()
                    if self.copy_ev[i - N] is not None:
                        self.copy_ev[i - N].synchronize()
                elif ex.bounce_free[slot] is not None:   # previous turn's last copies out of this slot
                    ex.bounce_free[slot].synchronize()
                t0 = time.perf_counter()
                ex.disk.read_layer(self.sess.store, i, self.hist, ex.bounce[slot, :self.hist])
                self.read_ms += (time.perf_counter() - t0) / MS
                self.ready[i].set()
        except BaseException as exc:  # surface reader failures in the serving thread
            self.error = exc
            for e in self.ready:
                e.set()

    def slot(self, i: int) -> torch.Tensor:
        self.ready[i].wait()
        if self.error is not None:
            raise self.error
        return self.ex.bounce[i % self.ex.plan.read_buffer_layers, :self.hist]

    def issued(self, i: int, copy_event):
        if self.ex.cuda:
            # Events in the pool are re-recorded next turn: keep a private marker for the slot.
            marker = torch.cuda.Event()
            marker.record(self.ex.load_stream)
            self.copy_ev[i] = marker
            self.ex.bounce_free[i % self.ex.plan.read_buffer_layers] = marker
        self.copied[i].set()

    def join(self):
        self.thread.join()
        if self.error is not None:
            raise self.error


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def prompt_ids(sid: str, turn: int, n: int, vocab: int) -> list[int]:
    """Deterministic stand-in token ids for a turn's prompt (timing does not depend on their values)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{sid}/{turn}".encode()))
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def turn_shapes(tier: str, prompt_tokens, output_tokens) -> list[tuple[int, int]]:
    """(history tokens reused, new tokens prefilled) of each turn of one session, as `run_turn` serves it.

    Recompute prefills everything so far; a reusing tier keeps every token's KV but the last reply
    token's, which the next turn prefills with its prompt (see `Executor.run_turn`).
    """
    out, tokens, kv = [], 0, 0
    for p, o in zip(prompt_tokens, output_tokens):
        p, o = int(p), int(o)
        hist, n = (0, tokens + p) if tier == "recompute" else (kv, tokens - kv + p)
        out.append((hist, n))
        tokens += p + max(o, 1)
        kv = 0 if tier == "recompute" else hist + n + max(o - 1, 0)
    return out


def session_capacity(turns: pd.DataFrame) -> int:
    """Tokens of KV a session holds after its last turn (prompts plus replies), plus one of slack."""
    return int(turns["prompt_tokens"].sum() + turns["output_tokens"].sum()) + 1


# RoPE positions a trace's decoder gets beyond its longest session: padded prefill shapes attend over
# whole buckets past the last real token.
PADDING_SLACK_TOKENS = 4096


@dataclass(frozen=True)
class TraceBounds:
    """What an executor must hold to serve a trace: each session's KV and the longest turn."""
    capacities: tuple[int, ...]    # tokens of KV per session (`session_capacity`)
    max_new: int                   # tokens a turn prefills and decodes at most, plus slack

    @classmethod
    def of(cls, trace: pd.DataFrame) -> "TraceBounds":
        return cls(tuple(session_capacity(g) for _, g in trace.groupby("session_id")),
                   int((trace.prompt_tokens + trace.output_tokens).max()) + 8)

    @property
    def max_ctx(self) -> int:
        return max(self.capacities) + 8

    def host_bytes(self, token_bytes: int, extra_sessions: int = 0, extra_tokens: int = 0) -> int:
        """Host memory for every session's KV (`token_bytes` per token, all layers), each reservation
        rounded up to the O_DIRECT alignment."""
        return ((sum(self.capacities) + extra_tokens) * token_bytes
                + (len(self.capacities) + extra_sessions) * 2 * ALIGN)


def decoder_for_trace(shape, trace: pd.DataFrame, device, dtype, seed: int = 2) -> M.Decoder:
    """The random-weight decoder that serves `trace`: RoPE tables long enough for its padded prefills."""
    return M.random_decoder(shape, TraceBounds.of(trace).max_ctx + PADDING_SLACK_TOKENS, device, dtype, seed=seed)


def executor_for_trace(model: M.Decoder, plan: ServePlan, trace: pd.DataFrame, arena: HostArena | None = None,
                       ssd_dir=None) -> Executor:
    """An executor sized for `trace` (its own host arena unless one is passed), without the per-layer
    detail events that cost host time inside a turn."""
    b = TraceBounds.of(trace)
    host = 0 if arena is not None else b.host_bytes(model.shape.kv_bytes_per_token)
    return Executor(model, plan, max_ctx=b.max_ctx, max_new=b.max_new, host_bytes=host, arena=arena,
                    ssd_dir=ssd_dir, detail_events=False)


def serve_trace(ex: Executor, trace: pd.DataFrame, on_turn=None, sample_clock: bool = False,
                agree=None) -> pd.DataFrame:
    """Replay a canonical trace through `ex`, FCFS, one turn at a time, in real time.

    Turn 0 of a session arrives at its arrival_s; a later turn at its arrival_s if given, else think_s
    after the previous turn's reply ended (the canonical trace's semantics, sim/trace.py). Returns one
    row per turn with the measured times.

    Everything a serving engine does before it takes requests happens before the clock starts: graphs
    captured, prompt token ids made (they stand in for the client's tokenized prompt), the trace turned
    into plain tuples (a pandas row lookup costs ~0.1 ms of host time between turns). Python's cyclic
    collector is kept out of the timed turns: objects made at set-up are frozen, and the collector runs
    only while the executor idles (a full collection over torch's and pandas' objects stalled a turn by
    10-30 ms: results/gpu/README.md).

    Tensor parallelism (gpu/tp_executor.py): every rank runs this loop over the same trace, and the ranks
    must serve the same turn at the same time. `agree(x)` returns rank 0's value of x on every rank:
    the clock origin (one monotonic clock serves every process of a host) and each reply's end, from
    which a think-time arrival is scheduled, so every rank's queue holds the same turns in one order.
    """
    by_sid = {sid: g.sort_values("turn") for sid, g in trace.groupby("session_id", sort=False)}
    for sid, g in by_sid.items():
        if sid not in ex.sessions:
            ex.open_session(sid, session_capacity(g))
    vocab = ex.model.shape.vocab
    turns = {sid: [(int(r.turn), float(r.arrival_s), float(r.think_s), int(r.output_tokens),
                    prompt_ids(sid, int(r.turn), int(r.prompt_tokens), vocab)) for r in g.itertuples()]
             for sid, g in by_sid.items()}
    heap = [(t[0][1], sid, 0) for sid, t in turns.items()]
    heapq.heapify(heap)
    ex.prepare_trace(trace)
    rows = []
    with collector_off_turns():
        clock0 = time.perf_counter()
        if agree is not None:
            clock0 = agree(clock0)
        while heap:
            arrival, sid, k = heapq.heappop(heap)
            turn, _, _, out_tokens, ids = turns[sid][k]
            _wait_until(clock0 + arrival, idle_work=_collect_young)
            clk = sm_clock_mhz() if sample_clock else float("nan")
            t = ex.run_turn(sid, turn, ids, out_tokens, arrival, clock0)
            t.sm_clock_mhz = clk
            rows.append(t)
            if on_turn is not None:
                on_turn(t)
            if k + 1 < len(turns[sid]):
                _, arr, think, _, _ = turns[sid][k + 1]
                nxt = arr if not math.isnan(arr) else (t.end_s if agree is None else agree(t.end_s)) + think
                heapq.heappush(heap, (nxt, sid, k + 1))
        ex.drain()
    df = timings_frame(rows)
    if len(df):   # the clock origin on the wall clock: turns line up with outside logs (a GPU clock log)
        df["epoch0_s"] = round(time.time() - time.perf_counter() + clock0, 4)
    return df


@contextlib.contextmanager
def collector_off_turns():
    """Python's cyclic collector off for timed turns (callers collect young objects while idle).

    What exists now is frozen (moved out of the collector's view): a full collection walks every
    tracked object, ~300k after importing torch and pandas, and took 10-30 ms inside turns.
    """
    was = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def _collect_young():
    gc.collect(1)


def sm_clock_mhz() -> float:
    """SM clock now (NVML through torch); NaN where NVML is not at hand."""
    try:
        return float(torch.cuda.clock_rate())
    except Exception:
        return float("nan")


def timings_frame(rows: list[TurnTiming]) -> pd.DataFrame:
    df = pd.DataFrame([dataclasses.asdict(t) for t in rows])
    if len(df):
        df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
        df["queue_s"] = df["start_s"] - df["arrival_s"]
    return df


def _wait_until(t: float, idle_work=None):
    """Return at time t (perf_counter). Sleep most of the way, spin the last millisecond (time.sleep
    overshoots by up to ~0.1 ms); `idle_work` runs once first if at least 20 ms are left."""
    if idle_work is not None and t - time.perf_counter() > 20 * MS:
        idle_work()
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        if left > 2 * MS:
            time.sleep(left - MS)
