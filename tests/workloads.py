"""Small random canonical traces for tests (no files, no packages)."""
import numpy as np
import pandas as pd


def random_sessions(n_sessions=50, seed=0, rate_per_s=2.0, mean_turns=4, prompt_mean=200, output_mean=150,
                    think_mean_s=5.0):
    rng = np.random.default_rng(seed)
    rows = []
    t = 0.0
    for s in range(n_sessions):
        t += rng.exponential(1.0 / rate_per_s)
        for k in range(int(rng.geometric(1.0 / mean_turns))):
            rows.append(dict(session_id=f"s{s}", turn=k, arrival_s=t if k == 0 else np.nan,
                             think_s=np.nan if k == 0 else rng.exponential(think_mean_s),
                             prompt_tokens=int(rng.integers(10, 2 * prompt_mean)),
                             output_tokens=int(rng.integers(1, 2 * output_mean))))
    return pd.DataFrame(rows)
