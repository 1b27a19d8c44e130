"""CachedAttention's decoupled truncation: reuse of pre-RoPE KV at new positions vs recomputation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu.roundattn.model import prefill, random_weights
from gpu.roundattn.rounds import Conversation, Round
from gpu.roundattn.truncation import (recompute_kv, reuse_saved_kv, score_reply, summarise_truncation, truncate,
                                      truncation_rows)
from sim.models import ModelShape

DEEP = ModelShape("deep", layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=97, max_context_tokens=512)
ONE_LAYER = dataclasses.replace(DEEP, name="one-layer", layers=1)


def conversation(n_rounds=4, prompt=6, reply=5, prefix=3, seed=0) -> Conversation:
    g = torch.Generator().manual_seed(seed)
    n = prefix + n_rounds * (prompt + reply)
    ids = tuple(int(x) for x in torch.randint(0, 97, (n,), generator=g))
    rounds = tuple(Round(prefix + i * (prompt + reply), prefix + i * (prompt + reply) + prompt,
                         prefix + (i + 1) * (prompt + reply) - 1, prefix + (i + 1) * (prompt + reply))
                   for i in range(n_rounds))
    return Conversation("t", ids, prefix, rounds)


def test_truncate_keeps_the_prefix_and_the_newest_history_tokens():
    conv = conversation()  # prefix 3, history 3 + 33 = 36 tokens, current round 11
    t = truncate(conv, 30)
    assert t.keep.tolist() == [0, 1, 2] + list(range(20, 36))
    assert t.dropped_tokens == 17
    assert truncate(conv, 47) is None  # fits: nothing to truncate
    assert truncate(conv, 14) is None  # not even prefix + current round fit


def test_saved_pre_rope_kv_does_not_depend_on_absolute_position():
    """RoPE enters only through relative position, so the pre-RoPE KV of the same tokens prefilled at
    shifted positions is the same in every layer (up to float rounding): what makes re-positioning valid."""
    w = random_weights(DEEP, seed=2)
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(5))
    a = prefill(w, ids)
    b = prefill(w, ids, positions=torch.arange(24) + 173)
    for la, lb in zip(a.layers, b.layers):
        assert torch.allclose(la.k, lb.k, atol=1e-4) and torch.allclose(la.v, lb.v, atol=1e-4)


def test_reusing_repositioned_kv_equals_recompute_when_kv_depends_only_on_the_token():
    """One layer: a token's KV is a function of the token alone, so the dropped tokens leave no trace and
    reuse (RoPE re-applied at the new positions) must equal recomputation of the truncated text."""
    w = random_weights(ONE_LAYER, seed=3)
    conv = conversation()
    t = truncate(conv, 30)
    cache = prefill(w, conv.ids()[: conv.history_tokens])
    reuse = score_reply(w, reuse_saved_kv(cache, t.keep), conv)
    recompute = score_reply(w, recompute_kv(w, conv, t.keep), conv)
    assert reuse.nll_sum == pytest.approx(recompute.nll_sum, rel=1e-5)
    assert torch.equal(reuse.top1, recompute.top1)
    full = score_reply(w, cache, conv)
    assert abs(full.nll_sum - recompute.nll_sum) > 1e-2  # the truncation did drop something


def test_reused_kv_carries_the_dropped_tokens_in_deeper_layers():
    """Above the first layer the saved KV saw the dropped tokens, so reuse is an approximation."""
    w = random_weights(DEEP, seed=4)
    conv = conversation()
    t = truncate(conv, 30)
    cache = prefill(w, conv.ids()[: conv.history_tokens])
    reused, recomputed = reuse_saved_kv(cache, t.keep), recompute_kv(w, conv, t.keep)
    assert torch.allclose(reused.layers[0].k, recomputed.layers[0].k, atol=1e-5)
    assert not torch.allclose(reused.layers[2].k, recomputed.layers[2].k, atol=1e-3)
    assert reused.positions.tolist() == list(range(t.keep.numel()))


def test_truncation_rows_and_summary_compare_the_three_histories_per_window():
    w = random_weights(DEEP, seed=5)
    convs = [conversation(seed=s) for s in range(2)]
    rows = [r for c in convs for r in truncation_rows(w, c, (20, 30, 500))]
    assert sorted({r["window_tokens"] for r in rows}) == [20, 30]  # 500 is not overflowed
    summ = summarise_truncation(rows)
    assert [s["window_tokens"] for s in summ] == [20, 30]
    for s in summ:
        assert s["conversations"] == 2 and s["reply_tokens"] == 2 * 4  # reply minus the template's newline
        assert s["reuse_vs_recompute_pct"] == pytest.approx(
            100 * (s["ppl_reuse_repositioned"] / s["ppl_recompute"] - 1))
