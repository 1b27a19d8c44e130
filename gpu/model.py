"""A LLaMA-shaped decoder with random weights: the compute the executor and the calibration both time.

Timing needs the right shapes and kernels, not trained weights, so weights are drawn at random. Shapes
are the simulator's (`sim.models.ModelShape`), so the executor, the calibration and the simulator agree
on what a layer computes and what a token's KV costs. The attention kernel is
`torch.nn.functional.scaled_dot_product_attention`, in the executor and in `gpu.bench` alike: one
function, `layer_forward`, runs a decoder layer for prefill (n new tokens after `start` cached ones) and
for decode (n = 1), so a calibrated per-layer time is the time of exactly the code that serves turns.

KV layout, per layer: `[batch, ctx, 2, kv_heads, head_dim]`. Keeping K and V of one token side by side
makes the history of a layer (tokens [0, h)) one contiguous block, so a tier moves a layer's history in
a single copy (the chunk the link profile is indexed by) -- CachedAttention §3.2 moves KV layer by layer.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from sim.models import MODELS, ModelShape


# The shapes this decoder runs: LLaMA-2 7B/13B (Touvron et al. 2023, no GQA at these sizes) and
# Llama-3.1-8B (grouped-query attention: 32 query heads over 8 KV heads).
SHAPES = {name: MODELS[name] for name in ("llama2-7b", "llama2-13b", "llama3.1-8b")}
# CPU tests: small enough to run in milliseconds, same code paths.
TINY = ModelShape("tiny", layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=101,
                  max_context_tokens=4096)
TINY_GQA = ModelShape("tiny-gqa", layers=4, hidden=64, heads=8, kv_heads=2, intermediate=96, vocab=101,
                      max_context_tokens=4096)
# LLaMA-2's RoPE base. Llama-3.1's is 500000 (with its long-context scaling): the angles differ, the
# kernels and so the timings do not.
ROPE_THETA = 10000.0


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # [hidden]
    wqkv: torch.Tensor        # [3 * heads * head_dim, hidden], fused like gpt-fast: one GEMM for q, k, v
    wo: torch.Tensor          # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor    # [hidden]
    w13: torch.Tensor         # [2 * intermediate, hidden], gate and up fused
    w2: torch.Tensor          # [hidden, intermediate]


@dataclass
class Decoder:
    shape: ModelShape         # under tensor parallelism, this rank's shard (`shard_shape`)
    embed: torch.Tensor       # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor     # [vocab, hidden]
    rope_cos: torch.Tensor    # [max_pos, head_dim]
    rope_sin: torch.Tensor
    # Tensor parallelism: an in-place all-reduce over the TP group that completes the attention
    # output's and the MLP's partial sums (Megatron's row-parallel split, gpu/tp_layer.py); None on
    # one GPU, where the residual add is folded into the GEMM.
    reduce: Optional[Callable[[torch.Tensor], object]] = None

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def _rand(shape, fan_in, gen, device, dtype):
    # Scaled so activations stay O(1) through many layers: NaN/inf would change kernel timings.
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(fan_in)).to(dtype)


def shard_shape(shape: ModelShape, tp: int) -> ModelShape:
    """One rank's share of `shape` under tensor parallelism: its query heads, KV heads and MLP columns
    (`gpu.tp_layer`'s split); head_dim stays the model's, and the KV a token costs is the shard's."""
    for what, n in (("heads", shape.heads), ("kv_heads", shape.kv_heads), ("intermediate", shape.intermediate)):
        if n % tp:
            raise ValueError(f"{shape.name}: {what} {n} does not split over tp={tp}")
    return dataclasses.replace(shape, heads=shape.heads // tp, kv_heads=shape.kv_heads // tp,
                               intermediate=shape.intermediate // tp, head_dim=shape.head_dim,
                               attention=shape.attention)


def shard_decoder(full: Decoder, rank: int, tp: int, reduce) -> Decoder:
    """Rank `rank`'s shard of `full` (tests: the shards' all-reduced layers equal the full ones).
    Column-parallel rows of Q, K, V and gate/up; row-parallel columns of O and down."""
    s = full.shape
    sh = shard_shape(s, tp)
    D, hq, hkv, ip = s.head_dim, sh.heads, sh.kv_heads, sh.intermediate

    def rows(w, start, per):
        return w[start + rank * per:start + (rank + 1) * per]
    layers = []
    for w in full.layers:
        q0, k0, v0 = 0, s.heads * D, (s.heads + s.kv_heads) * D
        layers.append(LayerWeights(
            attn_norm=w.attn_norm,
            wqkv=torch.cat([rows(w.wqkv, q0, hq * D), rows(w.wqkv, k0, hkv * D), rows(w.wqkv, v0, hkv * D)]),
            wo=w.wo[:, rank * hq * D:(rank + 1) * hq * D].contiguous(), mlp_norm=w.mlp_norm,
            w13=torch.cat([rows(w.w13, 0, ip), rows(w.w13, s.intermediate, ip)]),
            w2=w.w2[:, rank * ip:(rank + 1) * ip].contiguous()))
    return dataclasses.replace(full, shape=sh, layers=layers, reduce=reduce)


def random_layer(shape: ModelShape, device, dtype, seed: int = 0) -> LayerWeights:
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv_out = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    return LayerWeights(
        attn_norm=torch.ones(shape.hidden, device=device, dtype=dtype),
        wqkv=_rand((qkv_out, shape.hidden), shape.hidden, gen, device, dtype),
        wo=_rand((shape.hidden, shape.heads * shape.head_dim), shape.heads * shape.head_dim, gen, device, dtype),
        mlp_norm=torch.ones(shape.hidden, device=device, dtype=dtype),
        w13=_rand((2 * shape.intermediate, shape.hidden), shape.hidden, gen, device, dtype),
        w2=_rand((shape.hidden, shape.intermediate), shape.intermediate, gen, device, dtype),
    )


def rope_tables(shape: ModelShape, max_pos: int, device, dtype):
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, shape.head_dim, 2, device=device, dtype=torch.float32)
                                      / shape.head_dim))
    ang = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def random_decoder(shape: ModelShape, max_pos: int, device, dtype, seed: int = 0,
                   layers: int | None = None, reduce=None, rank: int = 0) -> Decoder:
    """A decoder with random weights; `layers` < shape.layers builds a partial stack (calibration).
    Under tensor parallelism `shape` is the rank's shard, `reduce` the TP all-reduce, and `rank` draws
    the rank's own layer weights; the embedding and LM head (replicated) are the same on every rank.

    Its `shape` carries the element size of `dtype`, so `shape.kv_bytes_per_token_layer` is what one
    token's KV occupies in this decoder's caches (bf16 on the GPU, float32 in CPU tests).
    """
    shape = dataclasses.replace(shape, dtype_bytes=dtype.itemsize)
    gen = torch.Generator(device=device).manual_seed(seed)
    cos, sin = rope_tables(shape, max_pos, device, dtype)
    n = shape.layers if layers is None else layers
    return Decoder(
        shape=shape,
        embed=_rand((shape.vocab, shape.hidden), 1.0, gen, device, dtype),
        layers=[random_layer(shape, device, dtype, seed=seed * 1000 + i + 1 + 100_003 * rank) for i in range(n)],
        final_norm=torch.ones(shape.hidden, device=device, dtype=dtype),
        lm_head=_rand((shape.vocab, shape.hidden), shape.hidden, gen, device, dtype),
        rope_cos=cos, rope_sin=sin, reduce=reduce,
    )


def new_kv_cache(shape: ModelShape, layers: int, batch: int, ctx: int, device, dtype) -> torch.Tensor:
    """KV for `layers` layers: [layers, batch, ctx, 2, kv_heads, head_dim]."""
    return torch.empty((layers, batch, ctx, 2, shape.kv_heads, shape.head_dim), device=device, dtype=dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # torch's own op: one fused kernel on CUDA where available (every launch counts, see layer_forward)
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, rot, sin)


def residual_matmul(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, reduce=None, out=None) -> torch.Tensor:
    """x + a @ w.T as one GEMM with beta = 1 (saves a launch per call). Under tensor parallelism
    (`reduce`), a @ w.T is this rank's partial sum: all-reduced first, then added to x once."""
    B, n, d = x.shape
    if reduce is None:
        r = torch.addmm(x.reshape(B * n, d), a.reshape(B * n, a.shape[-1]), w.T, out=out)
    else:
        t = a.reshape(B * n, a.shape[-1]) @ w.T
        reduce(t)
        r = torch.add(x.reshape(B * n, d), t, out=out)
    return r.view(B, n, d)


def project_qkv(s: ModelShape, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, n, heads, D] and the new tokens' K, V as the cache holds them, [B, n, 2, kv_heads, D],
    RoPE applied (cos, sin: [1, n, 1, D]). Q and K are rotated in one call: they sit side by side in
    the fused projection's output."""
    B, n, _ = x.shape
    hq, hkv, D = s.heads, s.kv_heads, s.head_dim
    qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
    qk = rotate_half(qkv[..., :(hq + hkv) * D].view(B, n, hq + hkv, D), cos, sin)
    kv = torch.stack([qk[:, :, hq:], qkv[..., (hq + hkv) * D:].view(B, n, hkv, D)], dim=2)
    return qk[:, :, :hq], kv


def attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask=None, causal: bool = False) -> torch.Tensor:
    """Attention of q [B, n, hq, D] over keys, vals [B, hkv, T, D] -> [B, n, hq * D].

    Query head h reads KV head h // (hq / hkv) (grouped-query attention; as torch's enable_gqa). With a
    boolean mask, or one query, a GQA call folds each KV head's group of g query heads into the query
    axis ([B, hkv, g n, D]; a mask given with n rows is repeated g times, one given with g n rows is
    used as it is): the fused kernels that take arbitrary masks refuse enable_gqa (run 13: memory-efficient
    attention refused it), and the fold needs no copy of K, V. Causal calls keep enable_gqa (flash takes it).
    """
    B, n, hq, D = q.shape
    hkv = keys.shape[1]
    if hq == hkv:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, is_causal=causal)
        return o.transpose(1, 2).reshape(B, n, hq * D)
    g = hq // hkv
    dense = isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias)   # CausalBias is a Tensor too
    if dense or (mask is None and not causal and n == 1):
        qf = q.view(B, n, hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, g * n, D)
        if dense and n > 1 and mask.shape[-2] == n:
            mask = mask.repeat(*([1] * (mask.dim() - 2)), g, 1)
        o = F.scaled_dot_product_attention(qf, keys, vals, attn_mask=mask)
        return o.view(B, hkv, g, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, hq * D)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, is_causal=causal,
                                       enable_gqa=True)
    return o.transpose(1, 2).reshape(B, n, hq * D)


def layer_forward(model: Decoder, li: int, x: torch.Tensor, cache: torch.Tensor, start: int,
                  w: LayerWeights | None = None) -> torch.Tensor:
    """One decoder layer over n new tokens at positions [start, start + n).

    x: [B, n, hidden]; cache: this layer's KV, [B, ctx, 2, kv_heads, head_dim], holding tokens [0, start)
    (loaded from a tier or computed earlier). The new tokens' K, V are written at [start, start + n) and
    attention runs over [0, start + n) with the causal mask aligned bottom-right (new token j sees all
    history and new tokens <= j).

    Written for few kernel launches (fused norm, q and k rotated together, residual adds folded into
    the GEMMs): at small n a layer is bound by the host's launch rate, not by the GPU.
    """
    s = model.shape
    w = model.layers[li] if w is None else w
    B, n, _ = x.shape
    cos = model.rope_cos[start:start + n].view(1, n, 1, s.head_dim)
    sin = model.rope_sin[start:start + n].view(1, n, 1, s.head_dim)
    q, kv = project_qkv(s, w, x, cos, sin)
    cache[:, start:start + n] = kv
    keys = cache[:, :start + n, 0].transpose(1, 2)       # [B, kv_heads, T, D], strided view, no copy
    vals = cache[:, :start + n, 1].transpose(1, 2)
    if n == 1:
        o = attend(q, keys, vals)
    elif start == 0:
        o = attend(q, keys, vals, causal=True)
    else:
        o = attend(q, keys, vals, mask=causal_lower_right(n, start + n))
    x = residual_matmul(x, o, w.wo, model.reduce)
    g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
    return residual_matmul(x, F.silu(g) * u, w.w2, model.reduce)


def embed(model: Decoder, token_ids: torch.Tensor) -> torch.Tensor:
    """token_ids: [B, n] -> [B, n, hidden]."""
    return model.embed[token_ids]


def head(model: Decoder, x_last: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on the last position of each sequence; returns logits [B, vocab] (float32)."""
    return (rms_norm(x_last, model.final_norm) @ model.lm_head.T).float()


def prefill_head(model: Decoder, x: torch.Tensor):
    """After the last layer of a prefill: logits of the last position and the greedy first token."""
    logits = head(model, x[:, -1])
    return logits, logits.argmax(-1)


def decode_step(model: Decoder, cur: torch.Tensor, cache: torch.Tensor, pos: int) -> torch.Tensor:
    """One decode iteration for B sequences at position `pos`: cur [B, 1] token ids -> next ids [B, 1].

    cache: [layers, B, ctx, 2, kv_heads, head_dim]. The executor and the calibration both call this,
    so the decode time the simulator is given is this code's time.
    """
    y = embed(model, cur)
    for i in range(len(model.layers)):
        y = layer_forward(model, i, y, cache[i], pos)
    return head(model, y[:, -1]).argmax(-1, keepdim=True)
