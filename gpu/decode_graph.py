"""Decode steps replayed as CUDA graphs: one launch per step instead of hundreds.

Why: in eager PyTorch a decode step of a 7B model is ~30 kernel launches per layer; on the lent
machine's host each launch costs tens of microseconds, so an eager step (~1 ms per layer) measures the
host, and its jitter, not the GPU (measurements in results/gpu/README.md). Real serving engines
(vLLM, SGLang, gpt-fast) capture decode in CUDA graphs for the same reason.

A graph has fixed shapes, but the context grows by one token per step. So the position lives in a
device tensor (`pos`): the new K, V are written with `index_copy_` at `pos`, RoPE rows are gathered
at `pos`, and attention runs over a fixed bucket of `tb` keys (a multiple of `bucket` tokens, the
smallest that holds pos + 1) with keys past `pos` masked out. One graph per (cache, bucket).
The same class times decode in `gpu.bench`, so the profile holds the cost of exactly this code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu import model as M
from gpu.prefill_graph import capture_mode

# Keys a decode graph attends over come in multiples of this (the executor's default): a step costs
# its bucket's keys, which a profile records as decode_padding (sim.costmodel)
DECODE_BUCKET = 256


def decode_layer_static(model: M.Decoder, li: int, x, cache, pos_t, tb: int, mask, cos, sin):
    """`gpu.model.layer_forward` for one new token per sequence at a device-side position."""
    s = model.shape
    w = model.layers[li]
    q, kv = M.project_qkv(s, w, x, cos, sin)
    cache.index_copy_(1, pos_t, kv)
    keys = cache[:, :tb, 0].transpose(1, 2)
    vals = cache[:, :tb, 1].transpose(1, 2)
    x = M.residual_matmul(x, M.attend(q, keys, vals, mask=mask), w.wo, model.reduce)
    g, u = (M.rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
    return M.residual_matmul(x, F.silu(g) * u, w.w2, model.reduce)


class DecodeGraphs:
    """Batch-B decode steps over one of several KV caches ([layers, B, ctx, 2, kv_heads, head_dim]).

    `stack` lists, per step position, (weight layer, cache layer); default: every layer of the model.
    On CPU (or with graphs=False) the same static-shape body runs eagerly, which the tests compare
    against `gpu.model.decode_step`.
    """

    def __init__(self, model: M.Decoder, caches: list[torch.Tensor], batch: int = 1, bucket: int = DECODE_BUCKET,
                 stack: list[tuple[int, int]] | None = None, buckets: list[int] | None = None,
                 graphs: bool | None = None):
        self.model, self.caches, self.B, self.bucket = model, caches, batch, bucket
        self.stack = [(i, i) for i in range(len(model.layers))] if stack is None else stack
        dev = model.device
        ctx = caches[0].shape[2]
        self.buckets = buckets or list(range(bucket, ctx + 1, bucket))
        self.cur = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.ar = torch.arange(ctx, device=dev)
        self.use_graphs = (dev.type == "cuda") if graphs is None else graphs
        self.graphs = {}
        if self.use_graphs:
            self._capture_all()

    def bucket_for(self, pos: int) -> int:
        for tb in self.buckets:
            if tb >= pos + 1:
                return tb
        raise ValueError(f"position {pos} past the largest bucket {self.buckets[-1]}")

    def _body(self, ci: int, tb: int):
        m, s = self.model, self.model.shape
        cache = self.caches[ci]
        mask = (self.ar[:tb] <= self.pos).view(1, 1, 1, tb)
        cos = m.rope_cos.index_select(0, self.pos).view(1, 1, 1, s.head_dim)
        sin = m.rope_sin.index_select(0, self.pos).view(1, 1, 1, s.head_dim)
        y = F.embedding(self.cur, m.embed)
        for wi, cl in self.stack:
            y = decode_layer_static(m, wi, y, cache[cl], self.pos, tb, mask, cos, sin)
        self.cur.copy_(M.head(m, y[:, -1]).argmax(-1, keepdim=True))

    def _capture_all(self):
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up off the capture: lazy init, kernel selection
            for ci in range(len(self.caches)):
                for tb in self.buckets:
                    self._body(ci, tb)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for ci in range(len(self.caches)):
            for tb in self.buckets:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, capture_error_mode=capture_mode(self.model)):
                    self._body(ci, tb)
                self.graphs[(ci, tb)] = g
        torch.cuda.synchronize()

    def step(self, ci: int, pos: int) -> torch.Tensor:
        """Decode one token for every sequence at position `pos` (tokens in `self.cur`, updated)."""
        tb = self.bucket_for(pos)
        self.pos.fill_(pos)
        if self.use_graphs:
            self.graphs[(ci, tb)].replay()
        else:
            self._body(ci, tb)
        return self.cur
