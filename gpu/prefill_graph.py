"""Prefill layers replayed as CUDA graphs of fixed, padded shapes: one launch per layer.

Why: run eagerly, a prefill layer is ~20 kernel launches; the lent machine's host issues one in
25-60 us, so a 7B layer at n <= 512 took 0.5-1.2 ms of host time against 0.15-0.3 ms of GPU time, and
that host time jittered 2x between runs and 3-4x after graph-replayed decode (measurements in
results/gpu/README.md). Such an executor measures its host, not the GPU, and no cost model predicts it within 5%.
Serving engines capture graphs of padded shapes for the same reason (vLLM pads decode batches to its
captured sizes); here prefill is padded too.

Shapes: n new tokens run as `nb` = the next bucket of `PADDING.new_tokens`; with history h > 0 the
keys run to `kb` = h + nb rounded up to `PADDING.context_multiple`, with a mask that lets query j (at
position h + j) see keys <= h + j. Padded queries come after the real ones, so no real token sees
them; their K, V land past the real context and are overwritten or masked later. Without history the
shape is plain causal over nb keys. The padding rule is `sim.costmodel.PrefillPadding`, the cost
model's own: the profile records it, and the simulator looks its tables up at the padded shape.

Positions, the mask, the RoPE rows, the embedding and the index of the last real token live in static
device buffers filled by a small "begin" graph per shape, so the per-layer graphs read fixed addresses.
One graph per (cache tensor, layer, nb, kb); on CPU (or graphs=False) the same bodies run eagerly,
which the CPU tests compare against recompute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu import model as M
from sim.costmodel import PrefillPadding

def capture_mode(model: M.Decoder) -> str:
    """CUDA-graph capture mode: with tensor parallelism the graphs hold NCCL all-reduces, and NCCL's
    watchdog thread queries events during a capture, which the default (global) mode counts as an
    error in the capture (run 13 captured all-reduces with thread_local on every rank)."""
    return "global" if model.reduce is None else "thread_local"


PADDING = PrefillPadding(new_tokens=(16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072,
                                     3584, 4096, 5120, 6144, 7168, 8192),
                         context_multiple=256)


class PrefillGraphs:
    """Prefill of up to `max_new` new tokens, batch 1, over the KV caches handed to `begin`.

    `stack` lists, per step, (weight layer, cache layer); default: every layer of the model.
    """

    def __init__(self, model: M.Decoder, max_new: int, stack: list[tuple[int, int]] | None = None,
                 graphs: bool | None = None, padding: PrefillPadding = PADDING):
        self.model, self.padding = model, padding
        s, dev = model.shape, model.device
        self.stack = [(i, i) for i in range(len(model.layers))] if stack is None else stack
        self.n_max = padding.new_bucket(max_new)
        self.use_graphs = (dev.type == "cuda") if graphs is None else graphs
        # grouped-query attention runs with each KV head's query heads folded into the query axis
        # (`gpu.model.attend`): the mask is built once per prefill with that many copies of its rows
        self.group = s.heads // s.kv_heads if s.heads != s.kv_heads else 1
        self.ids = torch.zeros(1, self.n_max, dtype=torch.long, device=dev)
        # zeros: a padded row must be finite, or 0 * NaN would leak through masked attention
        self.x = [torch.zeros(1, self.n_max, s.hidden, device=dev, dtype=model.dtype) for _ in range(2)]
        self.start = torch.zeros(1, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.n_max, dtype=torch.long, device=dev)
        self.cos = torch.zeros(self.n_max, s.head_dim, device=dev, dtype=model.dtype)
        self.sin = torch.zeros_like(self.cos)
        self.logits = torch.zeros(1, s.vocab, device=dev, dtype=torch.float32)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.ar = torch.arange(max(self.n_max, 1), device=dev)
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.begin_graphs: dict[tuple[int, int], object] = {}
        self.end_graphs: dict[int, object] = {}
        self.layer_graphs: dict[tuple[int, int, int], list] = {}   # (cache ptr, nb, kb) -> per step
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.captures = 0          # graphs captured so far (a capture inside a timed turn shows here)
        self.shape = None          # (nb, kb) of the prefill under way

    # ------------------------------------------------------------------ shapes
    def shape_for(self, new: int, hist: int) -> tuple[int, int]:
        nb, kv_extra = self.padding.padded(new, hist)
        return nb, nb + kv_extra

    def cache_tokens(self, max_ctx: int) -> int:
        """Tokens a cache must hold so that every padded prefill and decode bucket fits."""
        m = self.padding.context_multiple
        return -(-(max_ctx + self.padding.max_pad(self.n_max)) // m) * m

    # ------------------------------------------------------------------ bodies
    def _begin_body(self, nb: int, kb: int):
        m = self.model
        pos = self.pos[:nb]
        pos.copy_(self.ar[:nb] + self.start)
        self.cos[:nb].copy_(m.rope_cos.index_select(0, pos))
        self.sin[:nb].copy_(m.rope_sin.index_select(0, pos))
        if kb > nb:
            keys = torch.arange(kb, device=pos.device).view(1, kb)
            rows = pos.repeat(self.group)       # GQA: one copy of the rows per query head of a KV head
            self.masks[(nb, kb)].copy_((keys <= rows.view(-1, 1)).view(1, 1, self.group * nb, kb))
        self.x[0][:, :nb].copy_(F.embedding(self.ids[:, :nb], m.embed))

    def _layer_body(self, step: int, cache: torch.Tensor, nb: int, kb: int):
        m, s = self.model, self.model.shape
        wi, ci = self.stack[step]
        w = m.layers[wi]
        x, out = self.x[step % 2][:, :nb], self.x[(step + 1) % 2][0, :nb]
        c = cache[ci]
        q, kv = M.project_qkv(s, w, x, self.cos[:nb].view(1, nb, 1, s.head_dim),
                              self.sin[:nb].view(1, nb, 1, s.head_dim))
        c.index_copy_(1, self.pos[:nb], kv)
        keys = c[:, :kb, 0].transpose(1, 2)
        vals = c[:, :kb, 1].transpose(1, 2)
        if kb > nb:
            o = M.attend(q, keys, vals, mask=self.masks[(nb, kb)])
        else:
            o = M.attend(q, keys, vals, causal=True)
        h = M.residual_matmul(x, o, w.wo, m.reduce)
        g, u = (M.rms_norm(h, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
        M.residual_matmul(h, F.silu(g) * u, w.w2, m.reduce, out=out)

    def _end_body(self, nb: int):
        x = self.x[len(self.stack) % 2][:, :nb]
        self.logits.copy_(M.head(self.model, x.index_select(1, self.last).view(1, -1)))
        self.token.copy_(self.logits.argmax(-1))

    # ------------------------------------------------------------------ capture
    def prepare(self, cache: torch.Tensor, nb: int, kb: int, start: int | None = None):
        """Make the graphs of shape (nb, kb) for `cache` (warm-up run, then capture); no-op if there.

        The warm-up runs the bodies once (kernel selection, cuBLAS workspaces) and so writes padded-in
        K, V at positions [start, start + nb) of `cache`: callers pass the start of the prefill they
        are about to run (default kb - nb), whose own writes cover the same positions.
        """
        if kb > nb and (nb, kb) not in self.masks:
            self.masks[(nb, kb)] = torch.zeros(1, 1, self.group * nb, kb, dtype=torch.bool, device=self.ids.device)
        key = (cache.data_ptr(), nb, kb)
        if not self.use_graphs or key in self.layer_graphs:
            return
        if kb > cache.shape[2]:
            raise ValueError(f"prefill shape ({nb}, {kb}) needs {kb} cache tokens, the cache holds {cache.shape[2]}")
        self.start.fill_(kb - nb if start is None else start)
        self.last.fill_(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._begin_body(nb, kb)
            for i in range(len(self.stack)):
                self._layer_body(i, cache, nb, kb)
            self._end_body(nb)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if (nb, kb) not in self.begin_graphs:
            self.begin_graphs[(nb, kb)] = self._capture(lambda: self._begin_body(nb, kb))
        if nb not in self.end_graphs:
            self.end_graphs[nb] = self._capture(lambda: self._end_body(nb))
        self.layer_graphs[key] = [self._capture(lambda i=i: self._layer_body(i, cache, nb, kb))
                                  for i in range(len(self.stack))]
        torch.cuda.synchronize()

    def _capture(self, fn):
        # One pool for every graph: replays run one at a time on one stream, in any order, and each
        # body's temporaries die inside it, so the graphs can share their scratch memory.
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode=capture_mode(self.model)):
            fn()
        self.captures += 1
        return g

    # ------------------------------------------------------------------ one prefill
    def begin(self, ids: torch.Tensor, hist: int, cache: torch.Tensor):
        """Start a prefill of `ids` ([1, n] on the device) after `hist` cached tokens of `cache`."""
        self.begin_shape(ids, hist, cache, *self.shape_for(ids.shape[1], hist))

    def begin_shape(self, ids: torch.Tensor, hist: int, cache: torch.Tensor, nb: int, kb: int):
        """`begin` at an explicit shape (nb >= n new tokens, kb >= hist + nb keys): calibration grids."""
        n = ids.shape[1]
        if n > nb or hist + nb > kb:
            raise ValueError(f"prefill of {n} tokens after {hist}: does not fit shape ({nb}, {kb})")
        self.prepare(cache, nb, kb, start=hist)
        self.shape = (nb, kb)
        self.ids[:, :n].copy_(ids)
        self.start.fill_(hist)
        self.last.fill_(n - 1)
        self._cache = cache
        if self.use_graphs:
            self.begin_graphs[(nb, kb)].replay()
        else:
            self._begin_body(nb, kb)

    def layer(self, step: int):
        nb, kb = self.shape
        if self.use_graphs:
            self.layer_graphs[(self._cache.data_ptr(), nb, kb)][step].replay()
        else:
            self._layer_body(step, self._cache, nb, kb)

    def end(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [1, vocab] (float32) of the last real token and the greedy first token [1]."""
        nb, _ = self.shape
        if self.use_graphs:
            self.end_graphs[nb].replay()
        else:
            self._end_body(nb)
        return self.logits, self.token
