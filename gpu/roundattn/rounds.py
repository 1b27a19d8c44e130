"""Round bookkeeping: which token belongs to which round of a conversation.

A *round* is one user turn plus its reply (Round Attention, arXiv 2502.15294, §2: the round is the unit
in which history KV is stored, scored and loaded). The system prompt the chat template puts first is
the *prefix*: it belongs to no round, is always attended to and always stays on the GPU (it is the
attention sink of every later token; dropping it would be a different experiment).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Round:
    """Token span [start, end) of one round; [reply_start, reply_end) are the reply's own tokens (content
    and end-of-turn), the targets whose perplexity is measured. [start, reply_start) is the prompt: the
    user message and the assistant header, i.e. what a server has when it prefills this round."""
    start: int
    reply_start: int
    reply_end: int
    end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    token_ids: tuple[int, ...]
    prefix_end: int  # tokens [0, prefix_end) are the system prefix
    rounds: tuple[Round, ...]

    def __post_init__(self) -> None:
        edge = self.prefix_end
        for r in self.rounds:
            if not (r.start == edge and r.start < r.reply_start <= r.reply_end <= r.end):
                raise ValueError(f"{self.conv_id}: rounds must tile the tokens after the prefix: {r}")
            edge = r.end
        if edge != len(self.token_ids):
            raise ValueError(f"{self.conv_id}: rounds end at {edge}, tokens at {len(self.token_ids)}")

    @property
    def current(self) -> Round:
        """The round being served: the last one; all earlier rounds are its history."""
        return self.rounds[-1]

    @property
    def history(self) -> tuple[Round, ...]:
        return self.rounds[:-1]

    @property
    def history_tokens(self) -> int:
        """Tokens before the current round (prefix included): the reusable KV."""
        return self.current.start

    def ids(self) -> torch.Tensor:
        return torch.tensor(self.token_ids, dtype=torch.long)

    def upto(self, n_rounds: int) -> "Conversation":
        """The conversation as it stood when round ``n_rounds - 1`` was being served."""
        rounds = self.rounds[:n_rounds]
        return Conversation(self.conv_id, self.token_ids[: rounds[-1].end], self.prefix_end, rounds)


def round_of_token(conv: Conversation) -> torch.Tensor:
    """[T] round index of each token; -1 for the prefix."""
    out = torch.full((len(conv.token_ids),), -1, dtype=torch.long)
    for i, r in enumerate(conv.rounds):
        out[r.start: r.end] = i
    return out


def history_round_mass(key_mass: torch.Tensor, conv: Conversation) -> torch.Tensor:
    """Round-level attention: [n_layers, n_history_rounds], each row the share of the attention that the
    probed queries paid to the history rounds, normalised over those rounds (prefix mass left out: the
    prefix is always kept, so it is not a choice). ``key_mass`` is [n_layers, T_history] over the cache."""
    owner = round_of_token(conv)[: conv.history_tokens]
    n = len(conv.history)
    per_round = torch.zeros(key_mass.shape[0], n, dtype=key_mass.dtype)
    keep = owner >= 0
    per_round.index_add_(1, owner[keep], key_mass[:, keep])
    total = per_round.sum(dim=1, keepdim=True)
    return per_round / total.clamp_min(torch.finfo(key_mass.dtype).tiny)


def history_positions(conv: Conversation, rounds: tuple[int, ...]) -> torch.Tensor:
    """Cache indices (= positions) of the prefix and the chosen history rounds, ascending."""
    parts = [torch.arange(0, conv.prefix_end)]
    parts += [torch.arange(conv.rounds[i].start, conv.rounds[i].end) for i in sorted(rounds)]
    return torch.cat(parts)
