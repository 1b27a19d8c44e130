"""The slice of a canonical trace that the GPU executor serves and the simulator replays for validation.

Both sides get the same canonical trace file (sim/trace.py): the executor replays its arrivals in real
time, the simulator in simulated time. Replies are capped (decode costs device time; the simulator is
fed the same capped `output_tokens`), sessions are cut so their KV fits the model's window (no
truncation on either side), and arrivals are compressed so the run fits a device lease while the FCFS
queue still builds up.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from sim.trace import validate_trace


def make_slice(source: pd.DataFrame, n_sessions: int = 50, max_turns: int = 4, output_cap: int = 32,
               max_session_tokens: int = 4000, min_turns: int = 2, session_gap_s: float = 1.0,
               think_mean_s: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Pick `n_sessions` multi-turn sessions of `source` and make a replayable canonical trace.

    Sessions with at least `min_turns` turns are drawn at random (seeded); each keeps at most
    `max_turns` turns and stops before its KV (prompts + capped replies) would pass
    `max_session_tokens`. Session starts are a Poisson process with mean gap `session_gap_s`; think
    times are exponential with mean `think_mean_s`.
    """
    rng = np.random.default_rng(seed)
    src = validate_trace(source)
    turns = src.groupby("session_id")["turn"].count()
    first = src[src.turn == 0].set_index("session_id")
    fits = (first.prompt_tokens.clip(lower=1) + first.output_tokens.clip(upper=output_cap)) <= max_session_tokens
    # a session whose first turn alone is too long would leave nothing: not a candidate
    pool = sorted(set(turns[turns >= min_turns].index) & set(fits[fits].index))
    if len(pool) < n_sessions:
        raise ValueError(f"only {len(pool)} sessions with >= {min_turns} turns, need {n_sessions}")
    picked = rng.choice(pool, size=n_sessions, replace=False)
    rows = []
    t = 0.0
    for k, sid in enumerate(picked):
        g = src[src.session_id == sid].sort_values("turn")
        t += rng.exponential(session_gap_s) if k else 0.0
        used = 0
        for j, r in enumerate(g.head(max_turns).itertuples()):
            p, o = int(max(r.prompt_tokens, 1)), int(min(r.output_tokens, output_cap))
            if used + p + o > max_session_tokens:
                break
            used += p + o
            rows.append({"session_id": f"g{k:03d}", "turn": j, "arrival_s": t if j == 0 else np.nan,
                         "think_s": np.nan if j == 0 else float(rng.exponential(think_mean_s)),
                         "prompt_tokens": p, "output_tokens": o})
    return validate_trace(pd.DataFrame(rows))


def sharegpt_like(n_sessions: int = 400, seed: int = 0) -> pd.DataFrame:
    """A stand-in source when no ShareGPT trace is at hand: heavy-tailed prompt lengths (lognormal,
    median ~250 tokens, tail into the thousands, like pasted documents and code), 2-8 turns."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        for j in range(int(rng.integers(2, 9))):
            med = 400 if j == 0 else 180
            rows.append({"session_id": f"s{s}", "turn": j, "arrival_s": 0.0 if j == 0 else np.nan,
                         "think_s": np.nan if j == 0 else 10.0,
                         "prompt_tokens": int(np.clip(rng.lognormal(np.log(med), 1.0), 4, 3000)),
                         "output_tokens": int(np.clip(rng.lognormal(np.log(250), 0.6), 8, 1500))})
    return pd.DataFrame(rows)
