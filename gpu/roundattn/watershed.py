"""The watershed layer (Round Attention, arXiv 2502.15294, §3.1): the depth after which the round-level
attention distribution stops changing from one layer to the next, so the rounds that matter at the
watershed are the rounds that matter in every layer above it.

Similarity of two adjacent layers' round distributions p, q: ``1 - JSD(p, q)``, with JSD the
Jensen-Shannon *distance* in bits (sqrt of the divergence, base 2), a metric bounded in [0, 1]. It is
symmetric, defined when rounds get zero mass, and 1 only for equal distributions; cosine similarity is
kept as a second view for the plots.

Threshold 0.7: in SmolLM2 the adjacent-layer similarity has two sharp dips (regime changes of the round
distribution, similarity about 0.55-0.7), while pairs inside a regime stay at about 0.75-0.99; 0.7 lies in
that gap (see results/round_attention/layer_similarity.png). ``--threshold`` changes it.
"""
from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 0.7


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - Jensen-Shannon distance (base 2) along the last axis; p and q sum to 1 there."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(a > 0, a / m.clamp_min(1e-30), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(-1)

    jsd = (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)
    return 1.0 - jsd.sqrt()


def cosine_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(p, q, dim=-1)


def adjacent_similarity(dist: torch.Tensor) -> torch.Tensor:
    """[n_layers - 1]: similarity of layer l's round distribution with layer l+1's (dist: [L, rounds])."""
    return js_similarity(dist[:-1], dist[1:])


def find_watershed(similarity: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """First layer w from which every adjacent pair (w, w+1), (w+1, w+2), ... has similarity >= threshold;
    the last layer when even the top pair is below it (no watershed: keep every layer whole)."""
    w = similarity.numel()
    while w > 0 and similarity[w - 1] >= threshold:
        w -= 1
    return w
