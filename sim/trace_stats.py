"""What a canonical trace holds: sessions, turns, token distributions and how much prefill is reusable.

"Reusable" assumes an infinite cache, i.e. it is the ceiling any tiering policy can reach:
  * multi-turn rows: a turn's input is the session history (all earlier prompts and replies, the KV that
    CachedAttention keeps, arXiv 2403.19708) plus its new prompt; the history part is reusable;
  * rows with ``prefix_hashes`` (Mooncake): the input is ``prompt_tokens``; the leading blocks that an
    earlier request already had are reusable (``trace_mooncake.reusable_prefix_tokens``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.files import atomic_write
from sim.trace_mooncake import reusable_prefix_tokens


def per_turn(df: pd.DataFrame) -> pd.DataFrame:
    """Input tokens (history + new) and the reusable part of them, per row of a validated trace."""
    has_prefix = df["prefix_hashes"].notna().to_numpy()
    prompt = df["prompt_tokens"].to_numpy()
    output = df["output_tokens"].to_numpy()
    # validate_trace sorts by session and turn, so a cumulative sum within each session is the history.
    per_turn_total = pd.Series(prompt + output)
    history = (per_turn_total.groupby(df["session_id"].to_numpy()).cumsum() - per_turn_total).to_numpy()
    input_tokens = np.where(has_prefix, prompt, history + prompt)
    reusable = history.copy()
    if has_prefix.any():
        sub = df[has_prefix]
        reusable[has_prefix] = reusable_prefix_tokens(sub)
    return pd.DataFrame({"turn": df["turn"].to_numpy(), "input_tokens": input_tokens,
                         "reusable_tokens": reusable, "prompt_tokens": prompt, "output_tokens": output})


def _dist(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
            "max": float(v.max())}


def trace_stats(df: pd.DataFrame) -> dict:
    pt = per_turn(df)
    turns = df.groupby("session_id", sort=False).size().to_numpy()
    arrivals = df["arrival_s"].dropna()
    return {
        "sessions": int(len(turns)),
        "turns": int(len(df)),
        "rows_with_prefix_hashes": int(df["prefix_hashes"].notna().sum()),
        "turns_per_session": _dist(turns),
        "prompt_tokens": _dist(pt["prompt_tokens"]),
        "output_tokens": _dist(pt["output_tokens"]),
        "input_tokens": _dist(pt["input_tokens"]),
        "prefill_tokens_total": int(pt["input_tokens"].sum()),
        "reusable_tokens_total": int(pt["reusable_tokens"].sum()),
        "reusable_share": float(pt["reusable_tokens"].sum() / max(pt["input_tokens"].sum(), 1)),
        "first_arrival_s": float(arrivals.min()) if len(arrivals) else float("nan"),
        "last_arrival_s": float(arrivals.max()) if len(arrivals) else float("nan"),
    }


def format_stats(stats: dict, title: str = "") -> str:
    def d(name):
        s = stats[name]
        return f"mean {s['mean']:,.1f}  p50 {s['p50']:,.0f}  p99 {s['p99']:,.0f}  max {s['max']:,.0f}"

    lines = [title] if title else []
    lines += [
        f"sessions {stats['sessions']:,}  turns {stats['turns']:,}  "
        f"(rows with prefix hashes {stats['rows_with_prefix_hashes']:,})",
        f"turns/session   {d('turns_per_session')}",
        f"new prompt tok  {d('prompt_tokens')}",
        f"output tok      {d('output_tokens')}",
        f"input tok       {d('input_tokens')}   (history + new prompt = what prefill sees)",
        f"prefill tokens {stats['prefill_tokens_total']:,}, reusable {stats['reusable_tokens_total']:,} "
        f"= {100 * stats['reusable_share']:.1f}% (infinite cache)",
        f"arrivals {stats['first_arrival_s']:,.1f} s .. {stats['last_arrival_s']:,.1f} s",
    ]
    return "\n".join(lines)


def plot_stats(df: pd.DataFrame, png, title: str = "") -> Path:
    """Four panels: turns per session, tokens per turn, input length by turn index, reuse by turn index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pt = per_turn(df)
    turns = df.groupby("session_id", sort=False).size()
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    counts = turns.value_counts().sort_index()
    ax[0, 0].bar(counts.index, counts.to_numpy(), width=0.9)
    ax[0, 0].set(yscale="log", xlabel="turns per session", ylabel="sessions", title="Turns per session")
    bins = np.logspace(0, np.log10(max(pt["input_tokens"].max(), 10)) + 0.05, 60)
    ax[0, 1].hist(pt["prompt_tokens"].clip(lower=1), bins=bins, alpha=0.6, label="new prompt")
    ax[0, 1].hist(pt["output_tokens"], bins=bins, alpha=0.6, label="output")
    ax[0, 1].set(xscale="log", xlabel="tokens", ylabel="turns", title="Tokens per turn")
    ax[0, 1].legend()
    by_turn = pt.groupby("turn")
    shown = by_turn.size()
    shown = shown[shown >= 5].index  # percentiles of fewer turns are noise
    q = by_turn["input_tokens"].quantile([0.5, 0.9]).unstack().loc[shown]
    ax[1, 0].plot(q.index, q[0.5], marker="o", ms=3, label="p50")
    ax[1, 0].plot(q.index, q[0.9], marker="o", ms=3, label="p90")
    ax[1, 0].set(yscale="log", xlabel="turn index", ylabel="input tokens (history + new)",
                 title="Context length by turn index")
    ax[1, 0].legend()
    share = (by_turn["reusable_tokens"].sum() / by_turn["input_tokens"].sum().clip(lower=1)).loc[shown]
    if df["prefix_hashes"].notna().all():  # single-turn requests: show the spread across requests
        frac = pt["reusable_tokens"] / pt["input_tokens"].clip(lower=1)
        ax[1, 1].hist(frac, bins=20, range=(0, 1))
        ax[1, 1].set(xlabel="reusable share of the request's input", ylabel="requests",
                     title=f"Prefix reuse (overall {100 * pt['reusable_tokens'].sum() / pt['input_tokens'].sum():.1f}%)")
    else:
        ax[1, 1].plot(share.index, share.to_numpy(), marker="o", ms=3)
        ax[1, 1].set(ylim=(0, 1), xlabel="turn index", ylabel="reusable share of input tokens",
                     title=f"Reuse fraction (overall {100 * pt['reusable_tokens'].sum() / pt['input_tokens'].sum():.1f}%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
