"""Invariants of the simulator over 500 random configs (policy x eviction x fetch x preload x async save x
truncation x HBM/DRAM/SSD sizes x rates x batch x context window), plus 100 drawn where prefetches compete
with spills for a small store, each on a small random workload (5-20 sessions).

Whatever the config, a run completes and: every turn is served exactly once; no tier ever holds more
than its capacity; bytes are conserved (nothing is loaded that was not saved before, a hit is at most
the history); TTFT covers its own prefill; recompute never hits; the same seed gives the same output.
"""
from __future__ import annotations

import math
import json
import random

import numpy as np
import pandas as pd
import pytest

from sim.config import load_config
from sim.metrics import TurnRows, summarize
from sim.units import GB, MB
from sim.runner import serve
from sim.workload import load_workload
from workloads import random_sessions

N_CONFIGS = 500
N_PRESSURE = 100  # configs N_CONFIGS.. : a slice where prefetches compete with spills for a small store
SEED = 20240613
# llama2-7b: 0.5 MB of KV per token, 13.5 GB of weights. 20 GB of HBM leaves ~4.4 GB for KV (a few
# 4096-token contexts: HBM eviction and admission waits); 16 GB leaves ~0.8 GB, which holds one turn
# only with a window of at most 1024 tokens (0.5 GB) -- a longer turn is a config error, not a run.
HBM = [None, 20 * GB, 20 * GB, 16 * GB]
DRAM = [0, 50 * MB, 300 * MB, 1 * GB, 4 * GB, 128 * GB]
SSD = [0, 100 * MB, 600 * MB, 2 * GB, 2000 * GB]
CONTEXT = [None, None, 256, 512, 1024]  # small windows truncate the histories of random_sessions


def draw(k: int) -> tuple[dict, dict]:
    """Config overrides and random_sessions arguments of random config number `k`."""
    r = random.Random(SEED * 1000 + k)
    hbm = r.choice(HBM)
    window = r.choice(CONTEXT if hbm != 16 * GB else CONTEXT[2:])
    over = {
        "model": "llama2-7b",
        "seed": r.randrange(2**32),
        "policy.kind": r.choice(["recompute", "hbm_prefix", "attentionstore", "attentionstore"]),
        "policy.eviction": r.choice(["scheduler_aware", "lru", "fifo"]),
        "policy.scheduler_aware_fetch": r.random() < 0.5,
        "policy.layerwise_preload": r.random() < 0.5,
        "policy.async_save": r.random() < 0.5,
        "policy.truncation": r.choice(["decoupled_pe", "invalidate"]),
        "host.dram_bytes": r.choice(DRAM),
        "ssd.bytes": r.choice(SSD),
        "ssd.contention": r.choice([None, "none", "even_split", "interleaved"]),
        "scheduler.max_batch": r.choice([1, 2, 4, 64]),
        "scheduler.max_prefill_tokens": r.choice([64, 512, 8192]),
        "scheduler.lookahead_jobs": r.choice([0, 1, 4, 32]),
        "max_context_tokens": window,
        "workload.session_rate_per_s": r.choice([None, 0.05, 0.5, 5.0, 100.0]),
    }
    if hbm is not None:
        over["gpu.hbm_bytes"] = hbm
    # both engines, alternately (not drawn: the draws above stay what they were)
    over["scheduler.kind"] = ("prefill_first", "chunked")[k % 2]
    if k >= N_CONFIGS:
        # the prefetch-under-pressure slice: queued jobs' KV fetched from SSD into a small DRAM whose
        # victims spill to a small SSD, under recency eviction (which does not protect queued jobs)
        over.update({"policy.kind": "attentionstore", "policy.eviction": r.choice(["lru", "fifo"]),
                     "policy.scheduler_aware_fetch": True, "gpu.hbm_bytes": 20 * GB, "max_context_tokens": None,
                     "host.dram_bytes": r.choice(DRAM[1:4]), "ssd.bytes": r.choice(SSD[1:4]),
                     "scheduler.max_batch": r.choice([1, 2, 4]), "scheduler.lookahead_jobs": r.choice([4, 32])})
    wl = dict(n_sessions=r.randint(5, 15) if k < N_CONFIGS else r.randint(10, 20), seed=r.randrange(1000),
              rate_per_s=r.choice([0.1, 1.0, 10.0]), mean_turns=r.choice([1, 3, 5]), prompt_mean=r.choice([50, 200, 400]),
              output_mean=r.choice([20, 150]), think_mean_s=r.choice([0.0, 1.0, 20.0]))
    return over, wl


def simulate(over: dict, wl_args: dict):
    """(per-turn table, summary, replica) of one run; the replica is kept to read the tiers' peaks."""
    cfg = load_config({}, over)
    wl = load_workload(cfg, random_sessions(**wl_args))
    replica = serve(cfg, wl)
    rows = TurnRows(replica.rec, wl)
    return rows.table(), summarize(rows, replica, cfg), replica, wl


# Failures found in the engine/store, keyed by config number; each reason names the cause so that a
# fix flips them (strict: a case that starts passing fails until its mark is removed).
PREFETCH_EVICTS_ITSELF = (
    "sim/kvstore.py: making room in DRAM for a prefetch pushes DRAM victims to SSD, which can evict the "
    "very entry being prefetched; the engine then removes it from SSD twice (KeyError in sim/tiers.py)")
# configs that fail for a known cause, marked strict xfail (empty: configs 271, 539, 581, 591 and 596 failed
# with PREFETCH_EVICTS_ITSELF until the store pinned the entry it fetches)
KNOWN_FAILURES: dict[int, tuple[str, type]] = {}


def _params():
    out = []
    for k in range(N_CONFIGS + N_PRESSURE):
        marks = []
        if k in KNOWN_FAILURES:
            reason, exc = KNOWN_FAILURES[k]
            marks = [pytest.mark.xfail(strict=True, raises=exc, reason=reason)]
        out.append(pytest.param(k, marks=marks, id=f"cfg{k}"))
    return out


@pytest.mark.parametrize("k", _params())
def test_random_config_serves_every_turn_once_within_capacity_and_conserves_bytes(k):
    over, wl_args = draw(k)
    turns, summary, replica, wl = simulate(over, wl_args)
    store, kv_tok = replica.store, replica.kv_tok

    # every turn served exactly once, at finite times
    assert len(turns) == len(wl) == summary["turns"]
    assert not turns.duplicated(["session_id", "turn"]).any()
    for col in ("ttft_s", "prefill_s", "finish_s", "arrival_s", "queue_s"):
        assert np.isfinite(turns[col]).all(), col
    assert (turns["queue_s"] >= -1e-9).all()

    # no tier above its capacity at any time (peaks are the running maxima)
    for tier in (store.hbm, store.dram, store.ssd):
        assert tier.peak <= tier.capacity * (1 + 1e-12) + 1e-6, (tier.name, tier.peak, tier.capacity)
    assert summary["peak_dram_bytes"] <= over["host.dram_bytes"] + 1e-6
    assert summary["peak_ssd_bytes"] <= over["ssd.bytes"] + 1e-6

    # tokens: a hit is at most the history, and every context token is either reused or computed
    assert (turns["hit_tokens"] >= 0).all() and (turns["hit_tokens"] <= turns["history_tokens"]).all()
    ctx = turns["history_tokens"] + turns["prompt_tokens"]
    assert (turns["computed_tokens"] + turns["hit_tokens"] == ctx).all()
    window = over["max_context_tokens"] or 4096
    assert (ctx + turns["output_tokens"] <= window).all()

    # bytes: a turn loads at most its hit's KV, and reuses from the host only what its session saved
    # before (a save writes the turn's new KV only, so the saves of earlier turns add up to the history)
    assert (turns["bytes_loaded"] <= turns["hit_tokens"] * kv_tok + 1e-6).all()
    order = turns.sort_values(["session_id", "turn"], kind="stable")
    saved_before = order.groupby("session_id")["bytes_saved"].cumsum() - order["bytes_saved"]
    assert (order["bytes_loaded"] <= saved_before + 1e-6).all()
    from_host = order["hit_tier"].astype(str).isin(["dram", "ssd"])
    assert (order["hit_tokens"][from_host] * kv_tok <= saved_before[from_host] + 1e-6).all()
    # every token the trace asked for is served or counted as cut to fit the window
    asked = wl.prompt_tokens + wl.output_tokens
    served = turns["prompt_tokens"] + turns["output_tokens"]
    assert (served <= asked).all()
    if "clipped_tokens" in turns:
        assert (served + turns["clipped_tokens"] == asked).all()

    # timing: the first token comes after the turn's own prefill, the reply after the first token
    assert (turns["ttft_s"] >= turns["prefill_s"] - 1e-9).all()
    assert (turns["finish_s"] >= turns["arrival_s"] + turns["ttft_s"] - 1e-9).all()

    # policies: recompute never hits; the HBM prefix cache never loads from the host
    kind = over["policy.kind"]
    if kind == "recompute":
        assert (turns["hit_tokens"] == 0).all() and (turns["bytes_loaded"] == 0).all()
        assert set(turns["hit_tier"].astype(str)) <= {"none", "miss"}
    if kind != "attentionstore":
        assert not set(turns["hit_tier"].astype(str)) & {"dram", "ssd"}
        assert summary["bytes_ssd_write"] == 0 and summary["peak_dram_bytes"] == 0
    if over["ssd.bytes"] == 0:
        assert "ssd" not in set(turns["hit_tier"].astype(str)) and summary["bytes_ssd_write"] == 0

    # the same seed gives the same output (one config in five: the check doubles the time)
    if k % 5 == 0:
        again, summary2, _, _ = simulate(over, wl_args)
        pd.testing.assert_frame_equal(turns, again)
        assert json.dumps(summary, sort_keys=True) == json.dumps(summary2, sort_keys=True)  # NaN == NaN


def test_the_draws_cover_every_mechanism_and_force_eviction_and_truncation():
    """The 500 draws are not degenerate: every choice appears, tiny tiers and windows included."""
    draws = [draw(k)[0] for k in range(N_CONFIGS)]
    for key in ("policy.kind", "policy.eviction", "policy.scheduler_aware_fetch", "policy.layerwise_preload",
                "policy.async_save", "policy.truncation", "host.dram_bytes", "ssd.bytes", "scheduler.max_batch",
                "max_context_tokens", "workload.session_rate_per_s"):
        assert len({d[key] for d in draws}) >= 2, key
    combos = {(d["policy.kind"], d["policy.eviction"], d["policy.scheduler_aware_fetch"]) for d in draws}
    assert len(combos) == 3 * 3 * 2
    assert math.isclose(sum(d["policy.kind"] == "attentionstore" for d in draws) / N_CONFIGS, 0.5, abs_tol=0.08)
