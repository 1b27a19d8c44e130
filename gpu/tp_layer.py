"""A tensor-parallel LLaMA decoder layer with grouped-query attention, for timing TP on several GPUs.

Megatron-LM's split (Shoeybi et al. 2019, §3), as vLLM and gpt-fast's `tp.py` apply it: the Q/K/V and
gate/up projections are column-parallel (each rank holds `heads / tp` query heads, `kv_heads / tp` KV
heads and `intermediate / tp` MLP columns), the attention output and down projections are
row-parallel, so each of the two blocks ends in a partial sum over ranks that one all-reduce completes.
Everything between the two all-reduces is local: the rank's KV cache holds its own KV heads only.

The layer is written as two partial blocks (`attention_partial`, `mlp_partial`) and a forward that
joins them through a `reduce` callable, so a test can check on one process that the shards' partials
sum to the unsharded layer's, and the benchmark can time the same layer with the all-reduces removed.
Norm, RoPE and attention kernels are `gpu.model`'s (torch's SDPA), as the single-GPU executor runs them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from gpu.model import rms_norm, rotate_half
from sim.models import MODELS, ModelShape

# Llama-3.1-70B (its published config.json): per layer the same shape as LLaMA-2 70B (80 layers, hidden
# 8192, 64 heads, 8 KV heads, head_dim 128, intermediate 28672); the vocabulary and context differ.
LLAMA31_70B = dataclasses.replace(MODELS["llama2-70b"], name="llama3.1-70b", vocab=128256,
                                  max_context_tokens=131072)
# CPU tests: grouped-query attention (2 query heads per KV head) whose heads split over 2 or 4 ranks.
TINY_GQA = ModelShape("tiny-gqa", layers=2, hidden=64, heads=8, kv_heads=4, intermediate=96, vocab=101,
                      max_context_tokens=512)


@dataclass
class FullLayer:
    """Unsharded weights, nn.Linear's [out, in] layout."""
    attn_norm: torch.Tensor
    wq: torch.Tensor          # [heads * head_dim, hidden]
    wk: torch.Tensor          # [kv_heads * head_dim, hidden]
    wv: torch.Tensor
    wo: torch.Tensor          # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor
    w1: torch.Tensor          # gate, [intermediate, hidden]
    w3: torch.Tensor          # up, [intermediate, hidden]
    w2: torch.Tensor          # down, [hidden, intermediate]


@dataclass
class ShardLayer:
    """One rank's shard: fused column-parallel QKV and gate/up, row-parallel O and down."""
    heads: int                # query heads on this rank
    kv_heads: int
    head_dim: int
    attn_norm: torch.Tensor
    wqkv: torch.Tensor        # [(heads + 2 kv_heads) * head_dim, hidden]
    wo: torch.Tensor          # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor
    w13: torch.Tensor         # [2 * intermediate / tp, hidden]
    w2: torch.Tensor          # [hidden, intermediate / tp]


def check_tp(shape: ModelShape, tp: int) -> None:
    for what, n in (("heads", shape.heads), ("kv_heads", shape.kv_heads), ("intermediate", shape.intermediate)):
        if n % tp:
            raise ValueError(f"{shape.name}: {what} {n} does not split over tp={tp}")


def random_full_layer(shape: ModelShape, device, dtype, seed: int = 0) -> FullLayer:
    """Random weights scaled by 1/sqrt(fan_in), so activations stay O(1) (inf/NaN would change timings)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    D, H, I = shape.head_dim, shape.hidden, shape.intermediate

    def rand(rows, cols):
        return (torch.randn((rows, cols), generator=gen, device=device, dtype=torch.float32)
                / math.sqrt(cols)).to(dtype)

    return FullLayer(attn_norm=torch.ones(H, device=device, dtype=dtype),
                     wq=rand(shape.heads * D, H), wk=rand(shape.kv_heads * D, H), wv=rand(shape.kv_heads * D, H),
                     wo=rand(H, shape.heads * D), mlp_norm=torch.ones(H, device=device, dtype=dtype),
                     w1=rand(I, H), w3=rand(I, H), w2=rand(H, I))


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    """KV heads one rank holds: kv_heads / tp, or one (replicated on tp / kv_heads ranks) where there are
    fewer KV heads than ranks, as vLLM replicates the KV projection then (its query heads all read that
    head). Raises where the heads do not split."""
    for what, n in (("heads", shape.heads), ("intermediate", shape.intermediate)):
        if n % tp:
            raise ValueError(f"{shape.name}: {what} {n} does not split over tp={tp}")
    if shape.kv_heads >= tp:
        if shape.kv_heads % tp:
            raise ValueError(f"{shape.name}: kv_heads {shape.kv_heads} does not split over tp={tp}")
        return shape.kv_heads // tp
    if tp % shape.kv_heads:
        raise ValueError(f"{shape.name}: kv_heads {shape.kv_heads} cannot be replicated evenly over tp={tp}")
    return 1


def rank_shape(shape: ModelShape, tp: int) -> ModelShape:
    """One rank's share of `shape`: its query heads, KV heads (`kv_heads_per_rank`) and MLP columns;
    head_dim stays the model's."""
    return dataclasses.replace(shape, heads=shape.heads // tp, kv_heads=kv_heads_per_rank(shape, tp),
                               intermediate=shape.intermediate // tp, head_dim=shape.head_dim,
                               attention=shape.attention)


def shard(full: FullLayer, shape: ModelShape, rank: int, tp: int) -> ShardLayer:
    """Rank `rank`'s slice: rows of the column-parallel matrices, columns of the row-parallel ones. With
    fewer KV heads than ranks, the rank's K and V rows are those of the one KV head its query heads read."""
    D = shape.head_dim
    hq, hkv, ip = shape.heads // tp, kv_heads_per_rank(shape, tp), shape.intermediate // tp
    # the rank's first KV head: rank * hkv, or (replicated) the one its query heads rank * hq.. read
    k0 = rank * hkv if shape.kv_heads >= tp else rank // (tp // shape.kv_heads)

    def rows(w, per):
        return w[rank * per:(rank + 1) * per]

    return ShardLayer(
        heads=hq, kv_heads=hkv, head_dim=D, attn_norm=full.attn_norm,
        wqkv=torch.cat([rows(full.wq, hq * D), full.wk[k0 * D:(k0 + hkv) * D],
                        full.wv[k0 * D:(k0 + hkv) * D]]).contiguous(),
        wo=full.wo[:, rank * hq * D:(rank + 1) * hq * D].contiguous(),
        mlp_norm=full.mlp_norm,
        w13=torch.cat([rows(full.w1, ip), rows(full.w3, ip)]).contiguous(),
        w2=full.w2[:, rank * ip:(rank + 1) * ip].contiguous())


def shard_kv(cache: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """A rank's KV heads of a full cache [B, ctx, 2, kv_heads, head_dim]."""
    per = cache.shape[3] // tp
    return cache[:, :, :, rank * per:(rank + 1) * per].contiguous()


def attention_partial(w: ShardLayer, x: torch.Tensor, cache: torch.Tensor, start: int,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """This rank's share of the attention block's output (before the all-reduce), for n new tokens.

    x: [B, n, hidden], replicated on every rank; cache: [B, ctx, 2, kv_heads / tp, head_dim] holding
    tokens [0, start); the new tokens' K, V are written at [start, start + n). cos/sin: RoPE rows of
    positions [start, start + n), [n, head_dim].
    """
    B, n, _ = x.shape
    hq, hkv, D = w.heads, w.kv_heads, w.head_dim
    qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
    q = qkv[..., :hq * D].view(B, n, hq, D)
    k = qkv[..., hq * D:(hq + hkv) * D].view(B, n, hkv, D)
    cos, sin = cos.view(1, n, 1, D), sin.view(1, n, 1, D)
    cache[:, start:start + n, 0] = rotate_half(k, cos, sin)
    cache[:, start:start + n, 1] = qkv[..., (hq + hkv) * D:].view(B, n, hkv, D)
    keys = cache[:, :start + n, 0].transpose(1, 2)        # [B, kv_heads, T, D], strided view, no copy
    vals = cache[:, :start + n, 1].transpose(1, 2)
    qh = rotate_half(q, cos, sin).transpose(1, 2)
    gqa = hq != hkv
    if n == 1:
        o = F.scaled_dot_product_attention(qh, keys, vals, enable_gqa=gqa)
    elif start == 0:
        o = F.scaled_dot_product_attention(qh, keys, vals, is_causal=True, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=causal_lower_right(n, start + n),
                                           enable_gqa=gqa)
    return o.transpose(1, 2).reshape(B, n, hq * D) @ w.wo.T


def mlp_partial(w: ShardLayer, x: torch.Tensor) -> torch.Tensor:
    g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w.w2.T


def tp_layer_forward(w: ShardLayer, x: torch.Tensor, cache: torch.Tensor, start: int, cos: torch.Tensor,
                     sin: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One decoder layer on one rank: the two partial blocks, each completed by `reduce` (an all-reduce
    across the TP group; the identity times the same layer without communication)."""
    x = x + reduce(attention_partial(w, x, cache, start, cos, sin))
    return x + reduce(mlp_partial(w, x))
