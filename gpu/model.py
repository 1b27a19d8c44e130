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

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from sim.models import MODELS, ModelShape


# LLaMA-2 (Touvron et al. 2023, table of model sizes) has no GQA at 7B/13B: the shapes this decoder runs.
SHAPES = {name: MODELS[name] for name in ("llama2-7b", "llama2-13b")}
# CPU tests: small enough to run in milliseconds, same code paths.
TINY = ModelShape("tiny", layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=101,
                  max_context_tokens=4096)
ROPE_THETA = 10000.0   # LLaMA-2's RoPE base


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
    shape: ModelShape
    embed: torch.Tensor       # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor     # [vocab, hidden]
    rope_cos: torch.Tensor    # [max_pos, head_dim]
    rope_sin: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def _rand(shape, fan_in, gen, device, dtype):
    # Scaled so activations stay O(1) through many layers: NaN/inf would change kernel timings.
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(fan_in)).to(dtype)


def random_layer(shape: ModelShape, device, dtype, seed: int = 0) -> LayerWeights:
    if shape.kv_heads != shape.heads:
        raise ValueError(f"{shape.name}: grouped-query attention is not modelled (LLaMA-2 7B/13B have none)")
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
                   layers: int | None = None) -> Decoder:
    """A decoder with random weights; `layers` < shape.layers builds a partial stack (calibration).

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
        layers=[random_layer(shape, device, dtype, seed=seed * 1000 + i + 1) for i in range(n)],
        final_norm=torch.ones(shape.hidden, device=device, dtype=dtype),
        lm_head=_rand((shape.vocab, shape.hidden), shape.hidden, gen, device, dtype),
        rope_cos=cos, rope_sin=sin,
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


def residual_matmul(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x + a @ w.T as one GEMM with beta = 1 (saves a launch per call)."""
    B, n, d = x.shape
    return torch.addmm(x.reshape(B * n, d), a.reshape(B * n, a.shape[-1]), w.T).view(B, n, d)


def layer_forward(model: Decoder, li: int, x: torch.Tensor, cache: torch.Tensor, start: int,
                  w: LayerWeights | None = None) -> torch.Tensor:
    """One decoder layer over n new tokens at positions [start, start + n).

    x: [B, n, hidden]; cache: this layer's KV, [B, ctx, 2, heads, head_dim], holding tokens [0, start)
    (loaded from a tier or computed earlier). The new tokens' K, V are written at [start, start + n) and
    attention runs over [0, start + n) with the causal mask aligned bottom-right (new token j sees all
    history and new tokens <= j).

    Written for few kernel launches (fused norm, q and k rotated together, residual adds folded into
    the GEMMs): at small n a layer is bound by the host's launch rate, not by the GPU.
    """
    s = model.shape
    w = model.layers[li] if w is None else w
    B, n, _ = x.shape
    qkv = (rms_norm(x, w.attn_norm) @ w.wqkv.T).view(B, n, 3, s.heads, s.head_dim)
    cos = model.rope_cos[start:start + n].view(1, n, 1, 1, s.head_dim)
    sin = model.rope_sin[start:start + n].view(1, n, 1, 1, s.head_dim)
    qk = rotate_half(qkv[:, :, :2], cos, sin)
    cache[:, start:start + n, 0] = qk[:, :, 1]
    cache[:, start:start + n, 1] = qkv[:, :, 2]
    keys = cache[:, :start + n, 0].transpose(1, 2)       # [B, heads, T, D], strided view, no copy
    vals = cache[:, :start + n, 1].transpose(1, 2)
    qh = qk[:, :, 0].transpose(1, 2)
    if n == 1:
        o = F.scaled_dot_product_attention(qh, keys, vals)
    elif start == 0:
        o = F.scaled_dot_product_attention(qh, keys, vals, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=causal_lower_right(n, start + n))
    x = residual_matmul(x, o.transpose(1, 2).reshape(B, n, s.heads * s.head_dim), w.wo)
    g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
    return residual_matmul(x, F.silu(g) * u, w.w2)


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
