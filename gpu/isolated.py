"""Isolated turns over a grid of (model, history, new tokens, tier, sync vs overlapped load).

Each point serves one turn on an otherwise idle executor (no queue), so its measured TTFT can be held
directly against the cost model's prediction for that single turn, and its GPU event
spans give the achieved preload bandwidth and the overlap efficiency.
"""
from __future__ import annotations

import dataclasses
import time

import pandas as pd

from gpu.executor import Executor, collector_off_turns, prompt_ids
from gpu.plans import ServePlan


def run_grid(model, plans: list[ServePlan], histories, news, reps: int = 3, ssd_dir="/tmp/kvsim_ssd", log=print,
             idle_s: float = 0.02) -> pd.DataFrame:
    """Measure every (plan, history, new) point `reps` times after one unrecorded warm-up turn.

    Each timed turn starts after `idle_s` of idle executor, as a turn arriving at an idle server does
    (host and GPU idle before it, not mid-way through a hot loop); the collector stays out of it.
    """
    rows = []
    max_ctx = max(histories) + max(news) + 8
    tok_bytes = model.shape.kv_bytes_per_token
    for plan in plans:
        # Output of one token: no decode, so no decode graphs to capture.
        ex = Executor(model, plan, max_ctx=max_ctx, max_new=max(max(news), max(histories)) + 8,
                      host_bytes=len(histories) * max_ctx * tok_bytes + (1 << 20), ssd_dir=ssd_dir,
                      decode="eager")
        t_plan = time.perf_counter()
        try:
            for h in histories:
                sid = f"h{h}"
                ex.open_session(sid, max_ctx)
                ex.run_turn(sid, 0, prompt_ids(sid, 0, h, model.shape.vocab), 1, 0.0, 0.0)  # builds the history
                ex.drain()
                base = list(ex.sessions[sid].tokens[:h])
                for n in news:
                    # graphs are captured before the clock, as a serving engine does at start-up
                    ex.prepare_shape(sid, 0 if plan.tier == "recompute" else h,
                                     h + n if plan.tier == "recompute" else n)
                    ids = prompt_ids(sid, 1, n, model.shape.vocab)
                    with collector_off_turns():
                        for r in range(reps + 1):
                            sess = ex.sessions[sid]
                            sess.tokens, sess.kv_tokens = list(base), (0 if plan.tier == "recompute" else h)
                            ex.wait_saved(sess)
                            ex.drain()
                            time.sleep(idle_s)
                            clock0 = time.perf_counter()
                            t = ex.run_turn(sid, 1 + r, ids, 1, 0.0, clock0)
                            ex.drain()
                            if r == 0:
                                continue      # warm-up: first use of this shape
                            d = dataclasses.asdict(t)
                            d.update(model=model.shape.name, tier=plan.tier, overlap=plan.overlap,
                                     read_buffer_layers=plan.read_buffer_layers, rep=r,
                                     hist_tokens=h, prompt_tokens=n, ttft_s=t.first_token_s - t.arrival_s,
                                     kv_bytes_loaded=(h * tok_bytes if plan.tier in ("dram", "ssd") else 0))
                            rows.append(d)
        finally:
            ex.close()
        log(f"  {model.shape.name} {plan.tier:9s} overlap={plan.overlap!s:5s}: {time.perf_counter() - t_plan:.1f} s")
        del ex
    return pd.DataFrame(rows)
