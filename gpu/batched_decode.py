"""Pure-decode steps of the batched executor at static shapes, replayed as CUDA graphs (issue 15).

Why: the eager executor is launch-bound. A 1-sequence Llama-3.1-8B decode step takes ~13 ms on an H100
where its weights alone take ~6.5 ms: 32 layers of ~20 kernels, each launched from Python, so the
step's time follows the host CPU and drifts 1.0-1.35x over a run (results/gpu/run16_batched_calibrated).
A captured graph is one launch per step.

A graph has fixed shapes and fixed addresses, so a step is padded to a bucket:

* batch bucket `Bb` (`BATCH_BUCKETS`): rows past the step's B decode token 0 at position 0 with a
  context of 1; their K/V go to the scratch slot 0 (block 0 is the scheduler's null block: never
  handed out, never attended by a real row) and their outputs are dropped.
* packed-context bucket `Tb` (`token_buckets`): every row's keys are gathered into one packed
  [Tb, kv_heads, head_dim] K and V (real rows first, then one key per padded row, then unread
  filler), attended by the variable-length flash kernel with `cu_seqlens_k` built on the device. The
  kernel reads only [cu_k[i], cu_k[i + 1]) for row i, so the filler (slot 0) is never read.

Every per-step input (token ids, context lengths, block tables [Bb, W]) is one int32 array, copied
into one static device buffer at offsets fixed by Bb; positions, new-token slots, cu_seqlens_k and the
gather indices are computed from it inside the graph. On CPU (or with graphs off) the same body runs
eagerly: the tests compare it with the executor's eager path.
"""
from __future__ import annotations

import gc
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu.model import rms_norm, rotate_half

# the decode batch sizes a graph exists for (vLLM captures a similar ladder)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def token_buckets(limit: int, smallest: int = 64) -> list[int]:
    """Packed-context sizes: powers of sqrt(2) rounded up to 16 tokens, from `smallest` to the first at
    or past `limit`. A step pads its keys by at most ~41% (the gather copies padded rows too)."""
    out, k = [], 0
    while True:
        t = int(math.ceil(smallest * 2 ** (k / 2) / 16) * 16)
        if not out or t > out[-1]:
            out.append(t)
        if t >= limit:
            return out
        k += 1


def bucket_at_least(buckets, n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


def varlen_flash(q, keys, vals, cu_q, cu_k, max_q: int, max_k: int) -> torch.Tensor:
    """torch's variable-length flash kernel (causal, bottom-right aligned: one query sees its whole
    context); on CPU the same function per sequence, reading only [cu_k[i], cu_k[i + 1])."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(q, keys, vals, cu_q, cu_k, max_q, max_k, 0.0, True,
                                                       False)[0]
    from gpu.batched import varlen_attention
    return varlen_attention(q, keys, vals, cu_q, cu_k, max_q, max_k)


class StaticDecode:
    """Pure-decode steps of `ex` (a `gpu.batched.BatchedExecutor`) at static shapes: eager on CPU or
    with `graphs=False`, captured per (Bb, Tb) on CUDA (lazily, or ahead with `capture`)."""

    def __init__(self, ex, graphs: bool, max_batch: int = BATCH_BUCKETS[-1]):
        self.ex = ex
        m, s = ex.model, ex.shape
        self.batch_buckets = [b for b in BATCH_BUCKETS if b <= max_batch]
        self.max_pos = int(m.rope_cos.shape[0])
        self.W = -(-self.max_pos // ex.bt)          # block-table width: the longest sequence's blocks
        capacity = (ex.k.shape[1] - 1) * ex.bt       # tokens the paged cache holds
        self.token_buckets = token_buckets(capacity + self.batch_buckets[-1])
        Bmax, Tmax = self.batch_buckets[-1], self.token_buckets[-1]
        dev = ex.dev
        self.inp = torch.zeros(2 * Bmax + Bmax * self.W, dtype=torch.int32, device=dev)
        self.host = np.zeros(self.inp.shape[0], dtype=np.int32)
        self.ar = torch.arange(Tmax, device=dev)
        self.cu_q = torch.arange(Bmax + 1, dtype=torch.int32, device=dev)
        self.next = torch.zeros(Bmax, dtype=torch.long, device=dev)
        self.logits = torch.zeros((Bmax, s.vocab), dtype=torch.float32, device=dev)
        self.graphs = graphs
        self.captured: dict = {}
        self.pool = None
        self.failed: str | None = None   # why capture was given up (the step then runs eagerly)
        self.capture_s = 0.0
        self.replays = self.eager_steps = 0

    # ---- which bucket ----------------------------------------------------------------------------
    def key(self, ctxs: list[int]) -> tuple[int, int] | None:
        """(Bb, Tb) for decode rows of these context lengths (tokens with KV after the step), or None
        when past the largest buckets (the step then runs on the executor's eager path)."""
        B = len(ctxs)
        Bb = bucket_at_least(self.batch_buckets, B)
        if Bb is None or max(ctxs) > self.max_pos:
            return None
        Tb = bucket_at_least(self.token_buckets, sum(ctxs) + Bb - B)
        return None if Tb is None else (Bb, Tb)

    # ---- the body a graph holds ------------------------------------------------------------------
    def body(self, Bb: int, Tb: int) -> None:
        ex, m, s = self.ex, self.ex.model, self.ex.shape
        H, K, D, bt, W = s.heads, s.kv_heads, s.head_dim, ex.bt, self.W
        ids = self.inp[:Bb].long()
        ctx = self.inp[Bb:2 * Bb].long()
        table = self.inp[2 * Bb:2 * Bb + Bb * W].view(Bb, W).long()
        rows = self.ar[:Bb]
        pos = ctx - 1
        slots = table[rows, pos // bt] * bt + pos % bt              # where the new token's K/V go
        cu = torch.cumsum(ctx, 0)
        cu_k = torch.cat([cu.new_zeros(1), cu]).to(torch.int32)
        p = self.ar[:Tb]
        seq = torch.searchsorted(cu, p, right=True).clamp_(max=Bb - 1)
        off = p - (cu[seq] - ctx[seq])
        inside = p < cu[-1]
        off = torch.where(inside, off, 0)
        kv_slots = torch.where(inside, table[seq, off // bt] * bt + off % bt, 0)   # filler: slot 0
        x = m.embed[ids]
        cos = m.rope_cos[pos].view(Bb, 1, D)
        sin = m.rope_sin[pos].view(Bb, 1, D)
        cu_q = self.cu_q[:Bb + 1]
        max_k = min(Tb, self.max_pos)
        for li, w in enumerate(m.layers):
            qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
            q = rotate_half(qkv[:, :H * D].view(Bb, H, D), cos, sin)
            k = rotate_half(qkv[:, H * D:(H + K) * D].view(Bb, K, D), cos, sin)
            v = qkv[:, (H + K) * D:].view(Bb, K, D)
            kc, vc = ex.k[li].view(-1, K, D), ex.v[li].view(-1, K, D)
            # padded rows all write slot 0: whichever lands, only padded rows read it
            kc.index_copy_(0, slots, k)
            vc.index_copy_(0, slots, v)
            o = varlen_flash(q, kc.index_select(0, kv_slots), vc.index_select(0, kv_slots), cu_q, cu_k, 1, max_k)
            x = torch.addmm(x, o.reshape(Bb, H * D), w.wo.T)
            g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(g) * u, w.w2.T)
        logits = (rms_norm(x, m.final_norm) @ m.lm_head.T).float()
        self.logits[:Bb].copy_(logits)
        self.next[:Bb].copy_(logits.argmax(-1))

    # ---- inputs, capture, replay -----------------------------------------------------------------
    def fill(self, Bb: int, token_ids: list[int], ctxs: list[int], tables: list) -> None:
        """The step's inputs into the static buffer (one host-to-device copy); rows past B: token 0,
        context 1, block table of zeros (the scratch slot)."""
        B, W, h = len(ctxs), self.W, self.host
        n = 2 * Bb + Bb * W
        h[:n] = 0
        h[:B] = token_ids
        h[Bb:Bb + B] = ctxs
        h[Bb + B:2 * Bb] = 1
        tab = h[2 * Bb:n].reshape(Bb, W)
        for i, t in enumerate(tables):
            tab[i, :len(t)] = t
        self.inp[:n].copy_(torch.from_numpy(h[:n]))

    def _capture(self, key) -> None:
        Bb, Tb = key
        t = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):      # warm-up off the capture: lazy init, kernel selection
            self.body(Bb, Tb)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # one GPU, no NCCL watchdog querying events meanwhile: the default (global) mode
        # (`gpu.prefill_graph.capture_mode` is for the single-turn Decoder, which may hold all-reduces)
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="global"):
            self.body(Bb, Tb)
        torch.cuda.synchronize()
        self.captured[key] = g
        self.capture_s += time.perf_counter() - t

    def capture(self, keys=None, log=None, budget_s: float = math.inf) -> int:
        """Capture graphs ahead (default: every (Bb, Tb) a step could use: Tb from Bb to Bb x the
        longest sequence, within the cache), so no served step pays a capture. Returns how many."""
        if not self.graphs:
            return 0
        if keys is None:
            top = {Bb: bucket_at_least(self.token_buckets, Bb * self.max_pos) for Bb in self.batch_buckets}
            keys = [(Bb, Tb) for Bb in self.batch_buckets for Tb in self.token_buckets
                    if Tb >= Bb and (Tb <= Bb * self.max_pos or Tb == top[Bb])]
            # most likely first (a budget leaves the rest to be captured when used): ~1k tokens a row
            keys.sort(key=lambda k: abs(math.log2(k[1] / k[0] / 1024)))
        t0 = time.perf_counter()
        # torch.cuda.graph collects garbage at every capture: frozen objects make that quick
        gc.collect()
        gc.freeze()
        self.fill(1, [0], [1], [[0]])   # a valid (scratch-only) input while warming up
        n = 0
        for key in keys:
            if self.failed or time.perf_counter() - t0 > budget_s:
                break
            if key in self.captured:
                continue
            self.fill(key[0], [], [], [])
            try:
                self._capture(key)
                n += 1
            except Exception as exc:   # noqa: BLE001 - a kernel this torch cannot capture: stay eager
                self.failed = f"capture {key}: {exc!r}"[:400]
                if log:
                    log(f"decode graphs off: {self.failed}")
        gc.unfreeze()
        if log:
            log(f"decode graphs: {len(self.captured)} captured ({n} now) in {self.capture_s:.1f} s")
        return n

    def run(self, token_ids: list[int], ctxs: list[int], tables: list, key) -> None:
        """One pure-decode step into `self.next` / `self.logits` (rows [:B])."""
        Bb, Tb = key
        self.fill(Bb, token_ids, ctxs, tables)
        if self.graphs and not self.failed:
            if key not in self.captured:
                try:
                    # its warm-up runs this step once (the same K/V written twice): no state changes
                    self._capture(key)
                except Exception as exc:   # noqa: BLE001
                    self.failed = f"capture {key}: {exc!r}"[:400]
            if not self.failed:
                self.captured[key].replay()
                self.replays += 1
                return
        self.body(Bb, Tb)
        self.eager_steps += 1
