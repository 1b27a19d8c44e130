"""Why do trace-run prefills take longer than the same shapes in the isolated grid? (device run 4)

Serves the first sessions of the slice twice (recompute, DRAM overlapped) with the host's issue time
of the prefill layers and the SM clock recorded per turn, then replays the very same (history, new)
shapes back to back with no decode in between. Writes diag.csv.
  PYTHONPATH=. python3 bench/gpu_diagnose_prefill.py --out $OUT
"""
import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu import model as M  # noqa: E402
from gpu.executor import Executor, ServePlan, prompt_ids, serve_trace, session_capacity, sm_clock_mhz  # noqa: E402
from sim.trace import read_trace  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--sessions", type=int, default=10)
a = ap.parse_args()
t0 = time.perf_counter()
trace = read_trace("results/gpu/trace_slice.parquet")
trace = trace[trace.session_id.isin(sorted(trace.session_id.unique())[:a.sessions])]
shape = M.SHAPES["llama2-7b"]
capd = {sid: session_capacity(g) for sid, g in trace.groupby("session_id")}
caps = list(capd.values())
max_ctx, max_new = max(caps) + 8, int((trace.prompt_tokens + trace.output_tokens).max()) + 8
model = M.random_decoder(shape, max_ctx + 8, "cuda", torch.bfloat16, seed=2)
tok_bytes = shape.kv_bytes_per_token_layer(2) * shape.layers
frames = []
for run, plan in (("recompute", ServePlan("recompute")), ("dram_overlap", ServePlan("dram", True, 2))):
    for decode in ("graph", "eager"):
        ex = Executor(model, plan, max_ctx=max_ctx, max_new=max_new, host_bytes=sum(caps) * tok_bytes + (1 << 24),
                      decode=decode)
        df = serve_trace(ex, trace, sample_clock=True)
        ex.close()
        df["run"], df["mode"] = run, f"trace_{decode}"
        frames.append(df)
        print(f"[{time.perf_counter() - t0:5.1f}s] {run} {decode}: prefill ms median "
              f"{((df.first_token_s - df.start_s) * 1e3).median():.1f}, issue {df.issue_ms.median():.1f}, "
              f"clock {df.sm_clock_mhz.median():.0f}", flush=True)
        # the same turns again, back to back, output 1 (no decode between prefills)
        ex = Executor(model, plan, max_ctx=max_ctx, max_new=max_ctx, host_bytes=sum(caps) * tok_bytes + (1 << 24),
                      decode="eager")
        rows = []
        for r in df.itertuples():
            sid = f"b{r.session_id}"
            if sid not in ex.sessions:
                ex.open_session(sid, capd[r.session_id] if run != "recompute" else max_ctx)
            s = ex.sessions[sid]
            h = r.history_tokens if run != "recompute" else 0
            pre = r.new_tokens if run == "recompute" else r.history_tokens
            if run != "recompute" and s.kv_tokens != h:
                s.tokens, s.kv_tokens = [], 0
                if h:
                    ex.run_turn(sid, 0, prompt_ids(sid, 0, h, shape.vocab), 1, 0, 0)
                    ex.drain()
                    s.tokens, s.kv_tokens = s.tokens[:h], h
            s.tokens = s.tokens[:s.kv_tokens] if run != "recompute" else []
            clk = sm_clock_mhz()
            c0 = time.perf_counter()
            n = r.new_tokens
            t = ex.run_turn(sid, 1, prompt_ids(sid, 1, n, shape.vocab), 1, 0.0, c0)
            ex.drain()
            rows.append({**{k: getattr(t, k) for k in ("history_tokens", "new_tokens", "compute_ms", "issue_ms",
                                                        "load_ms", "prefill_span_ms")},
                         "session_id": r.session_id, "turn": r.turn, "first_token_s": t.first_token_s,
                         "start_s": t.start_s, "sm_clock_mhz": clk})
        ex.close()
        b = pd.DataFrame(rows)
        b["run"], b["mode"] = run, f"backtoback_after_{decode}"
        frames.append(b)
        print(f"[{time.perf_counter() - t0:5.1f}s] {run} back-to-back: prefill ms median "
              f"{((b.first_token_s - b.start_s) * 1e3).median():.1f}, issue {b.issue_ms.median():.1f}", flush=True)
        pd.concat(frames).to_csv(Path(a.out) / "diag.csv", index=False)
print("done", flush=True)
