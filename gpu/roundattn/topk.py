"""Which history rounds the layers above the watershed attend to, and what that costs in GPU memory.

Round Attention (arXiv 2502.15294, §3.2): layers 0..w (w = watershed) attend to the whole history and
keep its KV on the GPU; at layer w the current round's prompt scores the history rounds, and only the
top-k rounds' KV of layers w+1..L-1 is brought from host memory and attended to, with the current round.
The baseline keeps the *last* k rounds instead (a recency window), at the same memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gpu.roundattn.rounds import Conversation, history_positions


def top_k_rounds(round_dist: torch.Tensor, k: int) -> tuple[int, ...]:
    """The k history rounds with the most attention (ties to the older round; all if k >= rounds)."""
    k = min(k, round_dist.numel())
    order = sorted(range(round_dist.numel()), key=lambda i: (-float(round_dist[i]), i))
    return tuple(sorted(order[:k]))


def dynamic_k_rounds(round_dist: torch.Tensor, share: float) -> tuple[int, ...]:
    """The fewest rounds, taken by attention, whose mass reaches ``share`` of the total (at least one)."""
    order = sorted(range(round_dist.numel()), key=lambda i: (-float(round_dist[i]), i))
    total, chosen = float(round_dist.sum()), []
    acc = 0.0
    for i in order:
        chosen.append(i)
        acc += float(round_dist[i])
        if acc >= share * total - 1e-12:
            break
    return tuple(sorted(chosen))


def last_k_rounds(n_rounds: int, k: int) -> tuple[int, ...]:
    return tuple(range(max(0, n_rounds - k), n_rounds))


def layer_visibility(conv: Conversation, n_layers: int, watershed: int,
                     upper_rounds: tuple[int, ...]) -> list[Optional[torch.Tensor]]:
    """Per layer, the cache indices it may attend to: None (whole history) for layers 0..watershed,
    the prefix plus ``upper_rounds`` above it."""
    kept = history_positions(conv, upper_rounds)
    return [None if li <= watershed else kept for li in range(n_layers)]


@dataclass(frozen=True)
class Residency:
    """KV that must be on the GPU while the current round is served, in tokens summed over layers."""
    full_token_layers: int  # whole history in every layer, plus the current round
    kept_token_layers: int  # with the selection
    kept_history_fraction: float  # of the history tokens (prefix included), the share in the kept set
    upper_history_token_layers: int  # history KV of the layers above the watershed brought from host memory

    @property
    def saving(self) -> float:
        return 1.0 - self.kept_token_layers / self.full_token_layers


def residency(conv: Conversation, n_layers: int, watershed: int, upper_rounds: tuple[int, ...]) -> Residency:
    hist, cur = conv.history_tokens, conv.current.n_tokens
    kept_hist = conv.prefix_end + sum(conv.rounds[i].n_tokens for i in upper_rounds)
    lower, upper = watershed + 1, n_layers - watershed - 1
    full = n_layers * (hist + cur)
    kept = lower * (hist + cur) + upper * (kept_hist + cur)
    return Residency(full, kept, kept_hist / hist, upper * kept_hist)
