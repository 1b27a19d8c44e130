"""A small Llama forward in plain torch over a real model's weights, with the KV of each layer under our control.

Why not HF's forward: Round Attention (arXiv 2502.15294, §3) gives every layer its own set of visible
history tokens (all of them up to the watershed, only the selected rounds above it), and CachedAttention's
truncation (arXiv 2403.19708, §3.4 "decoupled KV cache truncation") needs the keys saved *before* RoPE so
that they can be re-encoded at new positions. Both are one line each here, and neither is in HF's cache API.

Two phases, named after serving:
- ``prefill``: the history, full causal attention; returns the KV cache (keys pre-RoPE, with positions).
- ``extend``: a new round attending to (a per-layer subset of) the cache plus itself, causally; returns
  logits and, for chosen query rows, the attention mass each cache token received (summed over heads).

The arithmetic follows HF ``LlamaForCausalLM`` (RMSNorm, rotate-half RoPE, GQA, SwiGLU); the SmolLM2
loader checks it against HF's logits (``gpu/roundattn/smollm2.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from sim.models import ModelShape


@dataclass(frozen=True)
class LayerWeights:
    wq: torch.Tensor  # [heads*head_dim, hidden]
    wk: torch.Tensor  # [kv_heads*head_dim, hidden]
    wv: torch.Tensor
    wo: torch.Tensor  # [hidden, heads*head_dim]
    w_gate: torch.Tensor  # [intermediate, hidden]
    w_up: torch.Tensor
    w_down: torch.Tensor  # [hidden, intermediate]
    attn_norm: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor


@dataclass(frozen=True)
class LlamaWeights:
    shape: ModelShape  # the simulator's shape table entry (KV bytes per token computed there)
    embed: torch.Tensor  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden]
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class LayerKV:
    k: torch.Tensor  # [kv_heads, T, head_dim], before RoPE
    v: torch.Tensor  # [kv_heads, T, head_dim]


@dataclass(frozen=True)
class KVCache:
    """Saved KV of a token sequence; keys are pre-RoPE so their positions can change (truncation)."""
    layers: tuple[LayerKV, ...]
    positions: torch.Tensor  # [T] long: the position each cached token is encoded at when attended to

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    def select(self, index: torch.Tensor, positions: Optional[torch.Tensor] = None) -> "KVCache":
        """Keep the tokens at ``index`` (e.g. after truncation), optionally re-positioned."""
        pos = self.positions[index] if positions is None else positions
        return KVCache(tuple(LayerKV(l.k[:, index], l.v[:, index]) for l in self.layers), pos)


@dataclass(frozen=True)
class ExtendResult:
    logits: Optional[torch.Tensor]  # [rows, vocab] for ``logit_rows`` (None when stopped early)
    key_mass: dict[str, torch.Tensor]  # probe name -> [n_layers, T_cache] attention mass on cache tokens
    hidden: Optional[torch.Tensor]  # residual stream after layer ``stop_after`` (for resuming), else None
    new_kv: Optional[KVCache]  # KV of the extended tokens (so a round can join the cache)


def random_weights(shape: ModelShape, seed: int = 0, scale: float = 0.08) -> LlamaWeights:
    """A random model of the given shape: enough to test bookkeeping and exact-equality properties."""
    g = torch.Generator().manual_seed(seed)

    def w(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=g) * scale

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(shape.hidden, generator=g)

    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layers = tuple(
        LayerWeights(w(qd, shape.hidden), w(kvd, shape.hidden), w(kvd, shape.hidden), w(shape.hidden, qd),
                     w(shape.intermediate, shape.hidden), w(shape.intermediate, shape.hidden),
                     w(shape.hidden, shape.intermediate), norm(), norm())
        for _ in range(shape.layers))
    embed = torch.randn(shape.vocab, shape.hidden, generator=g)
    return LlamaWeights(shape, embed, layers, norm(), embed)


def from_hf_state_dict(shape: ModelShape, sd: Mapping[str, torch.Tensor], rope_theta: float = 10000.0,
                      norm_eps: float = 1e-5) -> LlamaWeights:
    """Weights of an HF ``LlamaForCausalLM`` (HF layout: q/k already un-permuted from GGUF)."""
    def get(name: str) -> torch.Tensor:
        return sd[name].detach().to(torch.float32).contiguous()

    layers = tuple(
        LayerWeights(*(get(f"model.layers.{i}.{n}.weight") for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")))
        for i in range(shape.layers))
    embed = get("model.embed_tokens.weight")
    lm_head = get("lm_head.weight") if "lm_head.weight" in sd else embed  # tied embeddings
    return LlamaWeights(shape, embed, layers, get("model.norm.weight"), lm_head, rope_theta, norm_eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of the rotate-half RoPE (HF Llama layout) at integer ``positions``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., T, head_dim]: position enters the keys only here, at attention time, which is what
    lets saved pre-RoPE keys be re-encoded at new positions (CachedAttention §3.4)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _project(w: LlamaWeights, lw: LayerWeights, x: torch.Tensor):
    """q [H, T, d], k and v [Hkv, T, d] of normalised input x [T, hidden]; k is pre-RoPE."""
    s = w.shape
    h = rms_norm(x, lw.attn_norm, w.norm_eps)
    t = x.shape[0]
    q = (h @ lw.wq.T).view(t, s.heads, s.head_dim).transpose(0, 1)
    k = (h @ lw.wk.T).view(t, s.kv_heads, s.head_dim).transpose(0, 1)
    v = (h @ lw.wv.T).view(t, s.kv_heads, s.head_dim).transpose(0, 1)
    return q, k, v


def _mlp_residual(w: LlamaWeights, lw: LayerWeights, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    x = x + attn_out.transpose(0, 1).reshape(x.shape[0], -1) @ lw.wo.T
    h = rms_norm(x, lw.mlp_norm, w.norm_eps)
    return x + (F.silu(h @ lw.w_gate.T) * (h @ lw.w_up.T)) @ lw.w_down.T


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.repeat_interleave(groups, dim=0) if groups > 1 else t


@torch.no_grad()
def prefill(weights: LlamaWeights, token_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> KVCache:
    """Full causal attention over a token sequence; returns its KV cache (keys before RoPE)."""
    s = weights.shape
    pos = torch.arange(token_ids.numel()) if positions is None else positions
    x = weights.embed[token_ids]
    groups = s.heads // s.kv_heads
    kvs = []
    cos, sin = rope_tables(pos, s.head_dim, weights.rope_theta)
    for lw in weights.layers:
        q, k, v = _project(weights, lw, x)
        kvs.append(LayerKV(k, v))
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(qr, _expand_kv(kr, groups), _expand_kv(v, groups), is_causal=True)
        x = _mlp_residual(weights, lw, x, out)
    return KVCache(tuple(kvs), pos.clone())


@torch.no_grad()
def extend(weights: LlamaWeights, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor,
           visible: Optional[Sequence[Optional[torch.Tensor]]] = None,
           probes: Optional[Mapping[str, slice]] = None, *, start_layer: int = 0,
           hidden: Optional[torch.Tensor] = None, stop_after: Optional[int] = None,
           logit_rows: Optional[slice] = None, want_kv: bool = False) -> ExtendResult:
    """Run new tokens over the cache: each layer sees the cache tokens ``visible[layer]`` (indices into the
    cache; None = all) plus the new tokens causally.

    ``probes`` name query-row slices whose attention mass on each cache token is summed over heads and rows,
    per layer (unnormalised: rows' mass on their own round is left out). ``start_layer``/``hidden`` resume
    from a residual stream returned by an earlier call with ``stop_after`` (the layers below a watershed
    are identical for every selection, so they run once). ``logit_rows`` limits the LM head to those rows.
    """
    s = weights.shape
    groups = s.heads // s.kv_heads
    tq, tc = token_ids.numel(), cache.n_tokens
    x = weights.embed[token_ids] if hidden is None else hidden
    probes = dict(probes or {})
    mass = {name: torch.zeros(s.layers, tc) for name in probes}
    # additive mask on the new tokens' own block only: every visible cache token is in every row's past
    causal = torch.full((tq, tq), float("-inf")).triu(1)
    ccos, csin = rope_tables(cache.positions, s.head_dim, weights.rope_theta)
    qcos, qsin = rope_tables(positions, s.head_dim, weights.rope_theta)
    scale = 1.0 / math.sqrt(s.head_dim)
    new_kv: list[LayerKV] = []
    last = s.layers - 1 if stop_after is None else stop_after
    for li in range(start_layer, last + 1):
        lw, ckv = weights.layers[li], cache.layers[li]
        q, k, v = _project(weights, lw, x)
        if want_kv:
            new_kv.append(LayerKV(k, v))
        idx = None if visible is None else visible[li]
        if idx is None:
            ck = apply_rope(ckv.k, ccos, csin)
            cv = ckv.v
        else:
            ck = apply_rope(ckv.k[:, idx], ccos[idx], csin[idx])
            cv = ckv.v[:, idx]
        keys = torch.cat([ck, apply_rope(k, qcos, qsin)], dim=1)
        vals = torch.cat([cv, v], dim=1)
        scores = (apply_rope(q, qcos, qsin) @ _expand_kv(keys, groups).transpose(1, 2)) * scale
        scores[:, :, ck.shape[1]:] += causal  # scores: [H, Tq, Tc_visible + Tq]
        probs = torch.softmax(scores, dim=-1)
        out = probs @ _expand_kv(vals, groups)
        for name, rows in probes.items():
            m = probs[:, rows, : ck.shape[1]].sum(dim=(0, 1))
            if idx is None:
                mass[name][li] = m
            else:
                mass[name][li, idx] = m
        x = _mlp_residual(weights, lw, x, out)
    if stop_after is not None and stop_after < s.layers - 1:
        return ExtendResult(None, mass, x, None)
    rows = slice(None) if logit_rows is None else logit_rows
    logits = rms_norm(x[rows], weights.final_norm, weights.norm_eps) @ weights.lm_head.T
    kv = KVCache(tuple(new_kv), positions.clone()) if want_kv else None
    return ExtendResult(logits, mass, None, kv)


@torch.no_grad()
def full_logits(weights: LlamaWeights, token_ids: torch.Tensor, positions: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Logits of every position of a sequence in one causal pass (reference for tests and HF checks)."""
    pos = torch.arange(token_ids.numel()) if positions is None else positions
    empty = KVCache(tuple(LayerKV(torch.zeros(weights.shape.kv_heads, 0, weights.shape.head_dim),
                                  torch.zeros(weights.shape.kv_heads, 0, weights.shape.head_dim))
                          for _ in weights.layers), torch.zeros(0, dtype=torch.long))
    return extend(weights, empty, token_ids, pos).logits
