"""CachedAttention's KV truncation on a real model (arXiv 2403.19708, §3.4, "decoupled KV cache truncation").

When history plus the new round overflow the context window, the oldest history tokens are dropped.
CachedAttention saves KV *before* positional encoding so the kept tokens' KV can be reused: RoPE is
re-applied at their new, shifted positions. The alternative is to recompute the KV from the truncated text.
They differ because the saved KV of a kept token was computed while the dropped tokens were still visible
(in every layer above the first). Both are scored by the perplexity of the real next reply.

Truncation keeps the system prefix (as chat servers keep the system prompt) and drops the oldest history
tokens after it, token by token, until prefix + kept history + current round fit the window.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gpu.roundattn.model import KVCache, LlamaWeights, extend, prefill
from gpu.roundattn.rounds import Conversation


@dataclass(frozen=True)
class Truncation:
    keep: torch.Tensor  # cache indices (= original positions) kept, ascending
    dropped_tokens: int


def truncate(conv: Conversation, window_tokens: int) -> Optional[Truncation]:
    """Keep the prefix and the newest history tokens; None if nothing overflows or the round cannot fit."""
    hist, cur = conv.history_tokens, conv.current.n_tokens
    if hist + cur <= window_tokens:
        return None
    room = window_tokens - cur - conv.prefix_end
    if room <= 0:
        return None
    keep = torch.cat([torch.arange(conv.prefix_end), torch.arange(hist - room, hist)])
    return Truncation(keep, hist - conv.prefix_end - room)


def reuse_saved_kv(cache: KVCache, keep: torch.Tensor) -> KVCache:
    """(a) The saved pre-RoPE KV of the kept tokens, re-encoded at positions 0..n_kept-1."""
    return cache.select(keep, positions=torch.arange(keep.numel()))


def recompute_kv(weights: LlamaWeights, conv: Conversation, keep: torch.Tensor) -> KVCache:
    """(b) Prefill the truncated text from scratch."""
    return prefill(weights, conv.ids()[keep])


@dataclass(frozen=True)
class ReplyScore:
    nll_sum: float
    n_targets: int
    top1: torch.Tensor  # [n_targets] argmax next token

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_targets)


def score_reply(weights: LlamaWeights, cache: KVCache, conv: Conversation) -> ReplyScore:
    """Run the current round right after the cache's last position; score its real reply."""
    cur = conv.current
    ids = conv.ids()[cur.start: cur.end]
    start = int(cache.positions.max()) + 1 if cache.n_tokens else 0
    pos = torch.arange(start, start + ids.numel())
    rows = slice(cur.reply_start - 1 - cur.start, cur.reply_end - 1 - cur.start)
    logits = extend(weights, cache, ids, pos, logit_rows=rows).logits
    targets = conv.ids()[cur.reply_start: cur.reply_end]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return ReplyScore(float(nll), int(targets.numel()), logits.argmax(-1))


def truncation_rows(weights: LlamaWeights, conv: Conversation, windows: Sequence[int]) -> list[dict]:
    """One row per window that the conversation overflows: reply perplexity with the untruncated history,
    with the reused (re-positioned) KV, and with recomputed KV."""
    cases = [(w, t) for w in windows if (t := truncate(conv, w)) is not None]
    if not cases:
        return []
    cache = prefill(weights, conv.ids()[: conv.history_tokens])
    full = score_reply(weights, cache, conv)
    rows = []
    for window, t in cases:
        reuse = score_reply(weights, reuse_saved_kv(cache, t.keep), conv)
        recompute = score_reply(weights, recompute_kv(weights, conv, t.keep), conv)
        rows.append({"conv_id": conv.conv_id, "window_tokens": window, "history_tokens": conv.history_tokens,
                     "dropped_tokens": t.dropped_tokens, "kept_history_tokens": int(t.keep.numel()),
                     "n_targets": full.n_targets, "nll_full": full.nll_sum, "nll_reuse": reuse.nll_sum,
                     "nll_recompute": recompute.nll_sum,
                     "top1_agree_reuse_recompute": int((reuse.top1 == recompute.top1).sum())})
    return rows


def summarise_truncation(rows: list[dict]) -> list[dict]:
    """Per window: pooled reply perplexity of each method; reuse vs recompute as a percentage."""
    out = []
    for window in sorted({r["window_tokens"] for r in rows}):
        rs = [r for r in rows if r["window_tokens"] == window]
        n = sum(r["n_targets"] for r in rs)
        ppl = {m: math.exp(sum(r[f"nll_{m}"] for r in rs) / n) for m in ("full", "reuse", "recompute")}
        per_conv = [(r["nll_reuse"] - r["nll_recompute"]) / r["n_targets"] for r in rs]
        out.append({"window_tokens": window, "conversations": len(rs), "reply_tokens": n,
                    "mean_dropped_tokens": statistics.fmean(r["dropped_tokens"] for r in rs),
                    "ppl_full_history": ppl["full"], "ppl_reuse_repositioned": ppl["reuse"],
                    "ppl_recompute": ppl["recompute"],
                    "reuse_vs_recompute_pct": 100 * (ppl["reuse"] / ppl["recompute"] - 1),
                    "reuse_better_in": sum(d < 0 for d in per_conv),
                    "top1_agreement_pct": 100 * sum(r["top1_agree_reuse_recompute"] for r in rs) / n})
    return out
