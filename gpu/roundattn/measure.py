"""The Round Attention measurement on a real model: round-level attention per layer, the watershed, and
top-k round selection against full attention and a last-k window (arXiv 2502.15294, §3 and §4).

Per conversation the history (prefix + all rounds but the last) is prefilled once with full attention:
that is the KV a server saved in earlier turns. The current round (its prompt and its real reply, teacher
forced) is then run over that cache:
- once with full attention, which also records, per layer, the attention mass of the round's queries on
  every history token (for the round distributions and the watershed);
- once per selection, where the layers above the watershed see only the prefix and the selected rounds.
  The layers up to the watershed are the same in every selection, so they run once and are resumed from.
Selection uses the *prompt's* queries at the watershed (a server chooses before the reply exists); the
whole round's queries give a second round distribution (`FullPass.dist_round`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from gpu.roundattn.model import KVCache, LlamaWeights, extend, prefill
from gpu.roundattn.rounds import Conversation, history_round_mass
from gpu.roundattn.topk import (dynamic_k_rounds, last_k_rounds, layer_visibility, residency, top_k_rounds)
from gpu.roundattn.watershed import DEFAULT_THRESHOLD, adjacent_similarity, cosine_similarity, find_watershed


@dataclass(frozen=True)
class Variant:
    """A selection rule for the layers above the watershed: ``full``, ``topk``, ``lastk``. With ``share``
    instead of ``k``, ``topk`` is dynamic (the fewest rounds holding that share of the watershed layer's
    round attention) and ``lastk`` keeps as many rounds as dynamic top-k chose (the window at equal memory)."""
    name: str
    rule: str
    k: Optional[int] = None
    share: Optional[float] = None


def default_variants(ks: Sequence[int], shares: Sequence[float]) -> tuple[Variant, ...]:
    v = [Variant("full", "full")]
    v += [Variant(f"top{k}", "topk", k) for k in ks]
    v += [Variant(f"top_dyn{round(100 * s)}", "topk", share=s) for s in shares]
    v += [Variant(f"last{k}", "lastk", k) for k in ks]
    v += [Variant(f"last_dyn{round(100 * s)}", "lastk", share=s) for s in shares]
    return tuple(v)


@dataclass(frozen=True)
class FullPass:
    cache: KVCache
    dist_prompt: torch.Tensor  # [L, R_hist] round distribution of the prompt's queries
    dist_round: torch.Tensor  # [L, R_hist] ... of the whole current round's queries
    logits: torch.Tensor  # [n_targets, vocab] full attention, at the reply's target rows
    targets: torch.Tensor  # [n_targets] the real reply tokens


def _reply_rows(conv: Conversation) -> slice:
    cur = conv.current
    # the logit at row j predicts the token at row j+1
    return slice(cur.reply_start - 1 - cur.start, cur.reply_end - 1 - cur.start)


def _current(conv: Conversation) -> tuple[torch.Tensor, torch.Tensor]:
    cur = conv.current
    return conv.ids()[cur.start: cur.end], torch.arange(cur.start, cur.end)


def full_pass(weights: LlamaWeights, conv: Conversation) -> FullPass:
    cache = prefill(weights, conv.ids()[: conv.history_tokens])
    ids, pos = _current(conv)
    cur = conv.current
    probes = {"prompt": slice(0, cur.reply_start - cur.start), "round": slice(0, cur.n_tokens)}
    res = extend(weights, cache, ids, pos, probes=probes, logit_rows=_reply_rows(conv))
    return FullPass(cache, history_round_mass(res.key_mass["prompt"], conv),
                    history_round_mass(res.key_mass["round"], conv), res.logits,
                    conv.ids()[cur.reply_start: cur.reply_end])


def choose_rounds(variant: Variant, dist_at_watershed: torch.Tensor) -> tuple[int, ...]:
    n = dist_at_watershed.numel()
    if variant.rule == "full":
        return tuple(range(n))
    if variant.rule == "topk":
        return (top_k_rounds(dist_at_watershed, variant.k) if variant.k is not None
                else dynamic_k_rounds(dist_at_watershed, variant.share))
    if variant.rule == "lastk":
        k = variant.k if variant.k is not None else len(dynamic_k_rounds(dist_at_watershed, variant.share))
        return last_k_rounds(n, k)
    raise ValueError(f"unknown selection rule {variant.rule}")


def watershed_rows(conv: Conversation, fp: FullPass, threshold: float) -> tuple[dict, list[dict]]:
    """Per-conversation watershed (prompt and whole-round queries) and per-layer similarity rows."""
    layer_rows = []
    out = {"conv_id": conv.conv_id, "history_rounds": len(conv.history), "history_tokens": conv.history_tokens,
           "round_tokens": conv.current.n_tokens}
    for which, dist in (("prompt", fp.dist_prompt), ("round", fp.dist_round)):
        js = adjacent_similarity(dist)
        cos = cosine_similarity(dist[:-1], dist[1:])
        out[f"watershed_{which}"] = find_watershed(js, threshold)
        for li in range(js.numel()):
            layer_rows.append({"conv_id": conv.conv_id, "queries": which, "layer": li,
                               "js_similarity": float(js[li]), "cosine_similarity": float(cos[li])})
    return out, layer_rows


def distribution_rows(conv: Conversation, fp: FullPass) -> list[dict]:
    rows = []
    n_layers, n_rounds = fp.dist_prompt.shape
    for li in range(n_layers):
        for r in range(n_rounds):
            rows.append({"conv_id": conv.conv_id, "layer": li, "round": r, "rounds_back": n_rounds - r,
                         "mass_prompt": float(fp.dist_prompt[li, r]), "mass_round": float(fp.dist_round[li, r])})
    return rows


def evaluate_variants(weights: LlamaWeights, conv: Conversation, fp: FullPass, watershed: int,
                      variants: Sequence[Variant]) -> list[dict]:
    """One row per variant: KV resident on the GPU and the quality of the real reply. Variants that pick
    the same rounds (top-k and last-k often do) share one forward pass."""
    n_layers = weights.shape.layers
    ids, pos = _current(conv)
    lower = extend(weights, fp.cache, ids, pos, stop_after=watershed) if watershed < n_layers - 1 else None
    full_top1 = fp.logits.argmax(-1)
    per_token_layer = weights.shape.kv_bytes_per_token_layer   # as a server stores it (dtype_bytes, fp16)
    rows = []
    all_rounds = tuple(range(len(conv.history)))
    done: dict[tuple[int, ...], torch.Tensor] = {}
    for v in variants:
        chosen = choose_rounds(v, fp.dist_prompt[watershed])
        if v.rule == "full" or lower is None:
            logits = fp.logits  # nothing above the watershed to restrict
        elif chosen in done:
            logits = done[chosen]
        else:
            vis = layer_visibility(conv, n_layers, watershed, chosen)
            logits = extend(weights, fp.cache, ids, pos, vis, start_layer=watershed + 1, hidden=lower.hidden,
                            logit_rows=_reply_rows(conv)).logits
            done[chosen] = logits
        if chosen == all_rounds:
            done.setdefault(chosen, logits)
        nll = torch.nn.functional.cross_entropy(logits, fp.targets, reduction="sum")
        top1 = logits.argmax(-1)
        res = residency(conv, n_layers, watershed, chosen)
        rows.append({"conv_id": conv.conv_id, "variant": v.name, "rule": v.rule, "k": len(chosen),
                     "history_rounds": len(conv.history), "rounds_kept": " ".join(map(str, chosen)),
                     "kept_fraction": res.kept_history_fraction, "saving": res.saving,
                     "resident_kv_bytes": res.kept_token_layers * per_token_layer,
                     "full_kv_bytes": res.full_token_layers * per_token_layer,
                     "upper_history_loaded_bytes": res.upper_history_token_layers * per_token_layer,
                     "nll_sum": float(nll), "n_targets": int(fp.targets.numel()),
                     "agree_full": int((top1 == full_top1).sum()), "correct": int((top1 == fp.targets).sum())})
    return rows


def choose_global_watershed(per_conversation: Sequence[int]) -> int:
    """One watershed for the model: the median of the calibration conversations' (lower median on ties,
    i.e. the shallower layer: more layers restricted is the bolder choice, the data decides how bold)."""
    return int(statistics.median_low(per_conversation))


@dataclass(frozen=True)
class Spread:
    median: float
    q25: float
    q75: float
    lo: int
    hi: int

    @staticmethod
    def of(xs: Sequence[int]) -> "Spread":
        t = torch.tensor(list(xs), dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        return Spread(float(q[1]), float(q[0]), float(q[2]), int(t.min()), int(t.max()))


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant over all held-out conversations; perplexity pooled over every reply token."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    full = by["full"]
    full_ppl = math.exp(sum(r["nll_sum"] for r in full) / sum(r["n_targets"] for r in full))
    full_acc = sum(r["correct"] for r in full) / sum(r["n_targets"] for r in full)
    out = []
    for name, rs in by.items():
        n_tok = sum(r["n_targets"] for r in rs)
        ppl = math.exp(sum(r["nll_sum"] for r in rs) / n_tok)
        acc = sum(r["correct"] for r in rs) / n_tok
        out.append({
            "variant": name, "conversations": len(rs), "mean_k": statistics.fmean(r["k"] for r in rs),
            "kept_fraction": statistics.fmean(r["kept_fraction"] for r in rs),
            "gpu_kv_saving_pct": 100 * statistics.fmean(r["saving"] for r in rs),
            "resident_kv_mib": statistics.fmean(r["resident_kv_bytes"] for r in rs) / 2**20,
            "full_kv_mib": statistics.fmean(r["full_kv_bytes"] for r in rs) / 2**20,
            "upper_history_loaded_mib": statistics.fmean(r["upper_history_loaded_bytes"] for r in rs) / 2**20,
            "reply_ppl": ppl, "ppl_change_pct": 100 * (ppl / full_ppl - 1),
            "top1_agreement_pct": 100 * sum(r["agree_full"] for r in rs) / n_tok,
            "next_token_acc_pct": 100 * acc, "acc_change_pp": 100 * (acc - full_acc), "reply_tokens": n_tok})
    return out


@dataclass
class MeasureOutcome:
    watershed: int
    threshold: float
    shares: tuple[float, ...]
    watershed_rows: list[dict] = field(default_factory=list)  # per conversation
    layer_rows: list[dict] = field(default_factory=list)
    dist_rows: list[dict] = field(default_factory=list)
    variant_rows: list[dict] = field(default_factory=list)
    summary_rows: list[dict] = field(default_factory=list)


def measure(weights: LlamaWeights, calibration: Sequence[Conversation], held_out: Sequence[Conversation],
            ks: Sequence[int] = (1, 2, 4), shares: Sequence[float] = (0.8, 0.9),
            threshold: float = DEFAULT_THRESHOLD,
            watershed: Optional[int] = None, progress=None) -> MeasureOutcome:
    """Calibration conversations fix the watershed (unless given); held-out ones measure the selections."""
    out = MeasureOutcome(-1, threshold, tuple(shares))
    tick = progress or (lambda: None)
    for conv, role in [(c, "calibration") for c in calibration] + [(c, "held_out") for c in held_out]:
        fp = full_pass(weights, conv)
        w_row, l_rows = watershed_rows(conv, fp, threshold)
        w_row["set"] = role
        out.watershed_rows.append(w_row)
        out.layer_rows += l_rows
        out.dist_rows += distribution_rows(conv, fp)
        if role == "held_out":
            if out.watershed < 0:
                out.watershed = (watershed if watershed is not None else choose_global_watershed(
                    [r["watershed_prompt"] for r in out.watershed_rows if r["set"] == "calibration"]))
            out.variant_rows += evaluate_variants(weights, conv, fp, out.watershed, default_variants(ks, shares))
        tick()
    out.summary_rows = summarise(out.variant_rows)
    return out
