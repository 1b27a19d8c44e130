"""Steps of the batched executor at static shapes, replayed as CUDA graphs (issue 15).

Why: the eager executor is launch-bound. A 1-sequence Llama-3.1-8B decode step takes ~13 ms on an H100
where its weights alone take ~6.5 ms: 32 layers of ~20 kernels, each launched from Python, so the
step's time follows the host CPU and drifts 1.0-1.35x over a run (results/gpu/run16_batched_calibrated).
Steps with prefill chunks were launch-bound the same way (run 19: mixed-step MAPE 13-19% against a
calibration of the same call). A captured graph is one launch per step.

A graph has fixed shapes and fixed addresses, so a step is padded to the key (Bb, Nb, Kb) of
`sim.costmodel.StepPadding` (the cost model prices the same key):

* batch bucket `Bb`: decode rows past the step's B decode token 0 at position 0 with a context of 1;
  their K/V go to the scratch slot 0 (block 0 is the scheduler's null block: never handed out, never
  attended by a real row) and their outputs are dropped.
* chunk-token bucket `Nb` (0: no chunk): the step's prefill chunks (at most `chunk_slots`, each a
  sequence of its new tokens after its cached ones; unused slots are empty sequences) and, after them,
  Nb - (their new tokens) padding tokens forming one more sequence at position 0, writing and reading
  the scratch slot only.
* packed-key bucket `Kb`: every sequence's keys gathered into one packed [Kb, kv_heads, head_dim] K and
  V (decode rows, chunks, the padding sequence, then unread filler), attended by the variable-length
  flash kernel (one call for the decode rows, one for the chunks) with `cu_seqlens` built on the
  device. The kernel reads only [cu_k[i], cu_k[i + 1]) for sequence i, so the filler is never read.

Every per-step input (token ids, key counts, chunk lengths, block tables) is one int32 array, copied
into one static device buffer at offsets fixed by the key; positions, new-token slots, cu_seqlens and
the gather indices are computed from it inside the graph. On CPU (or with graphs off) the same body
runs eagerly: the tests compare it with the executor's eager path.
"""
from __future__ import annotations

import gc
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu.batched import residual_out
from gpu.model import rms_norm, rotate_half
from sim.costmodel import StepPadding, bucket_at_least, sqrt2_ladder

# the decode batch sizes a graph exists for (vLLM captures a similar ladder)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# prefill chunks of a step at most (a step with more runs eagerly; run 19's runs had <= 3 but for
# one preempting step of 6)
CHUNK_SLOTS = 4


def token_buckets(limit: int, smallest: int = 64) -> list[int]:
    """Packed-key sizes: powers of sqrt(2) rounded up to 16 tokens, from `smallest` to the first at or
    past `limit`. A step pads its keys by at most ~41% (the gather copies padded rows too)."""
    return list(sqrt2_ladder(limit, smallest))


def chunk_buckets(limit: int) -> list[int]:
    """A step's chunk tokens padded likewise, from 16 (the linear layers of a few tokens cost what 16 do)."""
    return list(sqrt2_ladder(limit, 16))


def varlen_flash(q, keys, vals, cu_q, cu_k, max_q: int, max_k: int) -> torch.Tensor:
    """torch's variable-length flash kernel (causal, bottom-right aligned: a query sees its sequence's
    keys up to its own position); on CPU the same function per sequence, reading only [cu_k[i], cu_k[i + 1])."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(q, keys, vals, cu_q, cu_k, max_q, max_k, 0.0, True,
                                                       False)[0]
    from gpu.batched import varlen_attention
    return varlen_attention(q, keys, vals, cu_q, cu_k, max_q, max_k)


class StaticStep:
    """Steps of `ex` (a `gpu.batched.BatchedExecutor`) at static shapes: eager on CPU or with
    `graphs=False`, captured per key (Bb, Nb, Kb) on CUDA (ahead with `capture`, or when first used)."""

    def __init__(self, ex, graphs: bool, max_batch: int = BATCH_BUCKETS[-1], chunk_slots: int = CHUNK_SLOTS,
                 max_chunk_tokens: int = 8192):
        self.ex = ex
        m, s = ex.model, ex.shape
        self.max_pos = int(m.rope_cos.shape[0])
        self.W = -(-self.max_pos // ex.bt)          # block-table width: the longest sequence's blocks
        capacity = (ex.k.shape[1] - 1) * ex.bt       # tokens the paged cache holds
        batch = tuple(b for b in BATCH_BUCKETS if b <= max_batch)
        chunk = tuple(chunk_buckets(max_chunk_tokens))
        keys = tuple(token_buckets(capacity + batch[-1] + chunk[-1]))
        self.padding = StepPadding(batch, chunk, keys, chunk_slots)
        Bmax, Nmax, Kmax, C = batch[-1], chunk[-1], keys[-1], chunk_slots
        Smax = Bmax + C + 1
        dev = ex.dev
        self.inp = torch.zeros(Bmax + Nmax + Smax + C + Smax * self.W, dtype=torch.int32, device=dev)
        self.host = np.zeros(self.inp.shape[0], dtype=np.int32)
        self.ar = torch.arange(max(Kmax, Nmax), device=dev)
        self.cu_q = torch.arange(Bmax + 1, dtype=torch.int32, device=dev)
        self.next = torch.zeros(Bmax + C, dtype=torch.long, device=dev)
        self.logits = torch.zeros((Bmax + C, s.vocab), dtype=torch.float32, device=dev)
        self.graphs = graphs
        # shapes with chunks run only where listed (`capture` adds them; None: any shape, captured when
        # first used): a step whose own shape is not listed runs at the next listed key count of its
        # (Bb, Nb), as the cost model prices it (`IterationProfile.step_ms`), or eagerly
        self.chunk_shapes: set | None = None
        self.captured: dict = {}
        self.pool = None
        self.failed: str | None = None   # why capture was given up (steps then run eagerly)
        self.chunk_failed: str | None = None   # why shapes with chunks were (they then run eagerly)
        self.capture_s = 0.0
        self.replays = self.eager_steps = self.captured_in_run = 0

    # ---- which shape -----------------------------------------------------------------------------
    def key(self, ctxs: list[int], chunks=()) -> tuple[int, int, int] | None:
        """(Bb, Nb, Kb) of a step whose decode rows hold `ctxs` tokens each after it and whose chunks
        are `[(new, cached), ...]`; None when past the largest buckets or the rotary tables (the step
        then runs on the executor's eager path)."""
        if (ctxs and max(ctxs) > self.max_pos) or any(n + h > self.max_pos for n, h in chunks):
            return None
        k = self.padding.key(list(chunks), len(ctxs), sum(ctxs))
        if k is not None and k[1] and self.chunk_failed:
            return None
        if k is None or not k[1] or self.chunk_shapes is None or k in self.chunk_shapes:
            return k
        more = [kb for b, n, kb in self.chunk_shapes if (b, n) == k[:2] and kb > k[2]]
        return (k[0], k[1], min(more)) if more else None

    def _layout(self, Bb: int, Nb: int) -> tuple[int, int, int]:
        """(sequences, chunk slots, int32 inputs) of a key: ids [Bb + Nb], key counts [S], chunk new
        tokens [C], block tables [S, W]."""
        C = self.padding.chunk_slots if Nb else 0
        S = Bb + C + (1 if Nb else 0)
        return S, C, Bb + Nb + S + C + S * self.W

    # ---- the body a graph holds ------------------------------------------------------------------
    def body(self, Bb: int, Nb: int, Kb: int) -> None:
        ex, m, s = self.ex, self.ex.model, self.ex.shape
        H, K, D, bt, W = s.heads, s.kv_heads, s.head_dim, ex.bt, self.W
        S, C, n_in = self._layout(Bb, Nb)
        T = Bb + Nb
        o = 0
        ids = self.inp[o:o + T].long()
        o += T
        lens = self.inp[o:o + S].long()             # keys per sequence after the step
        o += S
        counts = self.inp[o:o + C].long()           # new tokens per chunk slot
        o += C
        table = self.inp[o:o + S * W].view(S, W).long()
        # decode rows: the new token at ctx - 1
        pos = lens[:Bb] - 1
        slots = table[self.ar[:Bb], pos // bt] * bt + pos % bt
        if Nb:
            # chunk rows: chunk j's row i at cached_j + i; rows past the chunks pad at position 0, slot 0
            cum_q = torch.cumsum(counts, 0)
            r = self.ar[:Nb]
            j = torch.searchsorted(cum_q, r, right=True)
            pad = j >= C
            jc = j.clamp(max=C - 1)
            cpos = lens[Bb + jc] - counts[jc] + (r - (cum_q[jc] - counts[jc]))
            cpos = torch.where(pad, 0, cpos)
            cslots = torch.where(pad, 0, table[Bb + jc, cpos // bt] * bt + cpos % bt)
            pos = torch.cat([pos, cpos])
            slots = torch.cat([slots, cslots])
            cu_qc = torch.cat([cum_q.new_zeros(1), cum_q, cum_q.new_full((1,), Nb)]).to(torch.int32)
        # every sequence's keys packed in order, then filler (slot 0, never read)
        cu = torch.cumsum(lens, 0)
        cu_k = torch.cat([cu.new_zeros(1), cu]).to(torch.int32)
        p = self.ar[:Kb]
        seq = torch.searchsorted(cu, p, right=True).clamp_(max=S - 1)
        off = p - (cu[seq] - lens[seq])
        inside = p < cu[-1]
        off = torch.where(inside, off, 0)
        kv_slots = torch.where(inside, table[seq, off // bt] * bt + off % bt, 0)
        x = m.embed[ids]
        cos = m.rope_cos[pos].view(T, 1, D)
        sin = m.rope_sin[pos].view(T, 1, D)
        cu_q = self.cu_q[:Bb + 1]
        max_k = min(Kb, max(self.max_pos, Nb))
        for li, w in enumerate(m.layers):
            qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
            q = rotate_half(qkv[:, :H * D].view(T, H, D), cos, sin)
            k = rotate_half(qkv[:, H * D:(H + K) * D].view(T, K, D), cos, sin)
            v = qkv[:, (H + K) * D:].view(T, K, D)
            kc, vc = ex.k[li].view(-1, K, D), ex.v[li].view(-1, K, D)
            # padded rows all write slot 0: whichever lands, only padded rows read it
            kc.index_copy_(0, slots, k)
            vc.index_copy_(0, slots, v)
            keys, vals = kc.index_select(0, kv_slots), vc.index_select(0, kv_slots)
            if Bb and Nb:
                o = torch.cat([varlen_flash(q[:Bb], keys, vals, cu_q, cu_k[:Bb + 1], 1, max_k),
                               varlen_flash(q[Bb:], keys, vals, cu_qc, cu_k[Bb:], Nb, max_k)])
            elif Nb:
                o = varlen_flash(q, keys, vals, cu_qc, cu_k, Nb, max_k)
            else:
                o = varlen_flash(q, keys, vals, cu_q, cu_k, 1, max_k)
            x = residual_out(x, o.reshape(T, H * D), w.wo, m.reduce)
            g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
            x = residual_out(x, F.silu(g) * u, w.w2, m.reduce)
        # the LM head over each decode row and each chunk slot's last row (an empty slot's is dropped)
        last = self.ar[:Bb]
        if Nb:
            last = torch.cat([last, Bb + (torch.cumsum(counts, 0) - 1).clamp(min=0)])
        R = Bb + C
        logits = (rms_norm(x[last], m.final_norm) @ m.lm_head.T).float()
        self.logits[:R].copy_(logits)
        self.next[:R].copy_(logits.argmax(-1))

    # ---- inputs, capture, replay -----------------------------------------------------------------
    def fill(self, key, token_ids: list[int], ctxs: list[int], tables: list, chunk_ids=(), chunks=(),
             chunk_tables=()) -> None:
        """The step's inputs into the static buffer (one host-to-device copy). Decode rows past B:
        token 0, context 1, block table of zeros (the scratch slot); chunk slots past the step's
        chunks: empty; chunk rows past theirs: token 0 (the padding sequence, keys in the scratch slot)."""
        Bb, Nb, _ = key
        S, C, n = self._layout(Bb, Nb)
        B, W, h = len(ctxs), self.W, self.host
        h[:n] = 0
        h[:B] = token_ids
        o = Bb
        if Nb:
            flat = [t for c in chunk_ids for t in c]
            h[o:o + len(flat)] = flat
        o += Nb
        lens = h[o:o + S]
        lens[:B] = ctxs
        lens[B:Bb] = 1
        if Nb:
            new = [c for c, _ in chunks]
            lens[Bb:Bb + len(chunks)] = [c + hh for c, hh in chunks]
            lens[S - 1] = Nb - sum(new)
            h[o + S:o + S + len(new)] = new
        o += S + C
        tab = h[o:n].reshape(S, W)
        for i, t in enumerate(tables):
            tab[i, :len(t)] = t
        for i, t in enumerate(chunk_tables):
            tab[Bb + i, :len(t)] = t
        self.inp[:n].copy_(torch.from_numpy(h[:n]))

    def _capture(self, key) -> None:
        t = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):      # warm-up off the capture: lazy init, kernel selection
            self.body(*key)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # one GPU: the default (global) mode; a TP rank's steps hold NCCL all-reduces, whose watchdog
        # thread queries events during a capture: thread_local there (`gpu.prefill_graph.capture_mode`)
        mode = "global" if self.ex.model.reduce is None else "thread_local"
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode=mode):
            self.body(*key)
        torch.cuda.synchronize()
        self.captured[key] = g
        self.capture_s += time.perf_counter() - t

    def _give_up(self, key, exc) -> None:
        """A capture failed: shapes with chunks stop being static (pure decode keeps its graphs) if it
        had chunks, every graph otherwise."""
        why = f"capture {key}: {exc!r}"[:400]
        if key[1]:
            self.chunk_failed = why
        else:
            self.failed = why

    def decode_keys(self) -> list[tuple[int, int, int]]:
        """Every pure-decode key a step could use (Kb from Bb to Bb x the longest sequence, within the
        cache), the likeliest first (~1k tokens a row)."""
        pad = self.padding
        top = {Bb: bucket_at_least(pad.keys, Bb * self.max_pos) for Bb in pad.batch}
        keys = [(Bb, 0, Kb) for Bb in pad.batch for Kb in pad.keys
                if Kb >= Bb and (Kb <= Bb * self.max_pos or Kb == top[Bb])]
        keys.sort(key=lambda k: abs(math.log2(k[2] / k[0] / 1024)))
        return keys

    def capture(self, keys=None, log=None, budget_s: float = math.inf, collect: bool = True) -> int:
        """Capture graphs ahead (default: `decode_keys`), so no served step pays a capture. Returns how
        many were captured now. `collect=False`: the caller has collected and frozen Python's objects
        (a full collection per call costs ~0.1 s with torch loaded)."""
        if keys is None:
            keys = self.decode_keys()
        if not self.graphs:
            if self.chunk_shapes is not None:
                self.chunk_shapes.update(k for k in keys if k[1])
            return 0
        t0 = time.perf_counter()
        # torch.cuda.graph collects garbage at every capture: frozen objects make that quick
        if collect:
            gc.collect()
            gc.freeze()
        n = 0
        for key in keys:
            if self.failed or time.perf_counter() - t0 > budget_s:
                break
            if key in self.captured or (key[1] and self.chunk_failed):
                continue
            if key[1] and self.chunk_shapes is not None:
                self.chunk_shapes.add(key)
            self.fill(key, [], [], [])   # a valid (scratch-only) input while warming up
            try:
                self._capture(key)
                n += 1
            except Exception as exc:   # noqa: BLE001 - a kernel this torch cannot capture: stay eager
                self._give_up(key, exc)
                if log:
                    log(f"static-shape graphs off: {self.failed or self.chunk_failed}")
        if collect:
            gc.unfreeze()
        if log:
            log(f"static-shape graphs: {len(self.captured)} captured ({n} now) in {self.capture_s:.1f} s")
        return n

    def run(self, key, token_ids: list[int], ctxs: list[int], tables: list, chunk_ids=(), chunks=(),
            chunk_tables=()) -> None:
        """One step into `self.next` / `self.logits`: decode rows [:B], chunk j at row Bb + j."""
        self.fill(key, token_ids, ctxs, tables, chunk_ids, chunks, chunk_tables)
        if self.graphs and not self.failed:
            if key not in self.captured:
                try:
                    # its warm-up runs this step once (the same K/V written twice): no state changes
                    self._capture(key)
                    self.captured_in_run += 1
                except Exception as exc:   # noqa: BLE001
                    self._give_up(key, exc)
            if key in self.captured:
                self.captured[key].replay()
                self.replays += 1
                return
        self.body(*key)
        self.eager_steps += 1
