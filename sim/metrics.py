"""One row per turn, and the summary a capacity planner reads (TTFT percentiles, hit rates, cost)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from sim.pricing import hourly_rate
from sim.tiers import TIER_CODES


class Recorder:
    """Per-turn columns, filled by index (one row per turn). Python lists: scalar stores into
    numpy arrays cost several times more, and this is the simulator's hottest path."""

    COLS = ("arrival_s", "admit_s", "ttft_s", "prefill_start_s", "prefill_s", "load_s", "fetch_wait_s",
            "finish_s", "history_tokens", "hit_tokens", "computed_tokens", "bytes_loaded", "bytes_saved",
            "batch_size", "prompt_tokens", "output_tokens")

    def __init__(self, n):
        self.n = n
        nan = float("nan")
        for c in self.COLS:
            setattr(self, c, [nan] * n)
        self.hit_tier = [0] * n
        self.truncated = [False] * n
        self.clipped_tokens = [0] * n

    def arrays(self) -> dict:
        out = {c: np.asarray(getattr(self, c), dtype=float) for c in self.COLS}
        out["hit_tier"] = np.asarray(self.hit_tier, dtype=np.int8)
        out["truncated"] = np.asarray(self.truncated, dtype=bool)
        out["clipped_tokens"] = np.asarray(self.clipped_tokens, dtype=np.int64)
        return out


def turn_table(rec: Recorder, wl) -> pd.DataFrame:
    c = rec.arrays()
    first_token = c["prefill_start_s"] + c["prefill_s"]
    return pd.DataFrame({
        "session_id": wl.session,
        "turn": wl.turn,
        "arrival_s": c["arrival_s"],
        "queue_s": c["admit_s"] - c["arrival_s"],
        "fetch_wait_s": c["fetch_wait_s"],
        "load_s": c["load_s"],
        "prefill_s": c["prefill_s"],
        "ttft_s": c["ttft_s"],
        "decode_s": c["finish_s"] - first_token,
        "finish_s": c["finish_s"],
        "hit_tier": pd.Categorical.from_codes(c["hit_tier"], TIER_CODES),
        "history_tokens": c["history_tokens"].astype(np.int64),
        "prompt_tokens": c["prompt_tokens"].astype(np.int64),
        "output_tokens": c["output_tokens"].astype(np.int64),
        "hit_tokens": c["hit_tokens"].astype(np.int64),
        "computed_tokens": c["computed_tokens"].astype(np.int64),
        "truncated": c["truncated"],  # history dropped or prompt/reply clipped to fit the window
        "clipped_tokens": c["clipped_tokens"],
        "bytes_loaded": c["bytes_loaded"],
        "bytes_saved": c["bytes_saved"],
        "batch_size": c["batch_size"].astype(np.int64),
    })


def summarize(df: pd.DataFrame, replica, cfg) -> dict:
    ttft = df["ttft_s"].to_numpy()
    n = len(df)
    eligible = df["hit_tier"] != "none"
    n_el = int(eligible.sum())
    counts = df.loc[eligible, "hit_tier"].value_counts()
    start = float(np.nanmin(df["arrival_s"])) if n else 0.0
    makespan = float(np.nanmax(df["finish_s"])) - start if n else 0.0
    store = replica.store
    gpu_busy = replica.busy_prefill_s + replica.busy_decode_s + replica.stall_save_s
    ctx_tokens = float((df["history_tokens"] + df["prompt_tokens"]).sum())
    # Cost of the work: GPU, DRAM and SSD are bought together, so all of them are charged for the
    # GPU-busy hours this workload needs (what a saturated fleet pays per turn). The provisioned
    # cost charges the same hardware for the whole makespan, idle time included.
    rate = hourly_rate(cfg)  # sim/pricing.py: a policy without a store does not buy DRAM/SSD
    gpu_per_h, storage_per_h = rate.gpu_usd, rate.store_usd
    busy_h = gpu_busy / 3600.0
    gpu_cost = gpu_per_h * busy_h
    storage_cost = storage_per_h * busy_h
    cost = gpu_cost + storage_cost
    out = {
        "name": cfg.name,
        "policy": cfg.policy.kind,
        "model": cfg.model,
        "turns": n,
        "sessions": int(df["session_id"].nunique()),
        "makespan_s": makespan,
        "ttft_mean_s": float(np.mean(ttft)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "queue_mean_s": float(df["queue_s"].mean()),
        "prefill_tokens_per_s": ctx_tokens / replica.busy_prefill_s if replica.busy_prefill_s else 0.0,
        "computed_tokens": int(df["computed_tokens"].sum()),
        "throughput_turns_per_s": n / makespan if makespan > 0 else 0.0,
        "hit_rate_hbm": counts.get("hbm", 0) / n_el if n_el else 0.0,
        "hit_rate_dram": counts.get("dram", 0) / n_el if n_el else 0.0,
        "hit_rate_ssd": counts.get("ssd", 0) / n_el if n_el else 0.0,
        "miss_rate": counts.get("miss", 0) / n_el if n_el else 0.0,
        # share of the context (history + prompt) whose KV was reused instead of computed
        "reused_token_fraction": float(df["hit_tokens"].sum()) / ctx_tokens if ctx_tokens else 0.0,
        "truncated_turns": int(df["truncated"].sum()),
        "clipped_turns": int((df["clipped_tokens"] > 0).sum()),
        "gpu_busy_s": gpu_busy,
        "gpu_prefill_s": replica.busy_prefill_s,
        "gpu_decode_s": replica.busy_decode_s,
        "save_stall_s": replica.stall_save_s,
        "bytes_h2d": store.h2d.bytes_moved,
        "bytes_d2h": store.d2h.bytes_moved,
        "bytes_ssd_read": store.ssd_r.bytes_moved,
        "bytes_ssd_write": store.ssd_w.bytes_moved,
        "peak_hbm_bytes": store.hbm.peak,
        "peak_dram_bytes": store.dram.peak,
        "peak_ssd_bytes": store.ssd.peak,
        "evictions_hbm": store.evictions["hbm"],
        "evictions_dram": store.evictions["dram"],
        "evictions_ssd": store.evictions["ssd"],
        "gpu_cost_usd": gpu_cost,
        "storage_cost_usd": storage_cost,
        "cost_usd": cost,
        "cost_per_1k_turns_usd": 1000.0 * cost / n if n else 0.0,
        "provisioned_cost_usd": (gpu_per_h + storage_per_h) * makespan / 3600.0,
    }
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
