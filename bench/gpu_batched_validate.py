"""One device call: the batched executor serves real multi-turn ShareGPT sessions under load, and the
simulator's cost model prices the same steps (issue 15).

On the GPU machine (no SimPy needed):
    PYTHONPATH=. python3 bench/gpu_batched_validate.py --out $OUT
On CPU, the same stages with a tiny model and a few requests:
    python bench/gpu_batched_validate.py --cpu-smoke --out /tmp/smoke
Afterwards, on CPU, the comparison again from the returned files (another cost model, say):
    python bench/gpu_batched_validate.py --compare DIR [--profile configs/hardware/h100.yaml]

Stages, each writing its files as it ends (a timeout still returns what is done):
1. attention micro-benchmark: whole steps of typical shapes (decode batches, a chunk with decodes) run
   with every attention kind of `gpu.batched.ATTENTION_KINDS`, checked against the per-request SDPA
   reference (relative error of the logits), timed with CUDA events (median); the fastest correct kind
   serves the runs. -> attn_bench.csv
1b. decode graphs (with --decode-graphs on, the default with CUDA): the graphs of `gpu.batched_decode`
   captured ahead for every (batch bucket, packed-context bucket) within --graph-capture-s, then pure-decode
   steps of --graph-bench-shapes run eagerly and as graphs, timed on the host clock (median) and their
   logits compared. -> graph_bench.csv
2. iteration calibration: a grid of synthetic steps run by the same executor (pure decode: batch x
   context per sequence; one prefill chunk alone: new x cached tokens; a chunk with a decode batch),
   each timed as the serving loop waits for it (host clock around `run`, which ends on the sampled
   tokens), reduced by `gpu.calibrate.iteration_from_raw` into the profile's optional `iteration`
   section, added to --base-profile. Then the runs' shapes: every run's trace replayed on this host by
   the same loop and scheduler on a cost model's clock (--replay-profile's, then the profile calibrated
   from that replay's shapes), each static shape (`sim.costmodel.StepPadding`) it predicts captured and
   timed (most frequent first, then each shape-with-chunks' next key count, within --shape-calib-s and
   --shape-calib2-s) into the profile's `steps_ms`, and the loop's host time per step into its
   `host_step_ms`. -> iteration_raw.csv, replay_steps.csv, profile_calibrated.yaml
3. runs: for each arrival rate (sessions/s; the slice of traces/sharegpt_small.parquet drawn with
   `gpu.trace_slice.make_slice`, replies up to --output-cap tokens) and each policy (recompute, hbm
   prefix caching, dram layer-wise), the executor serves the slice in real time; then runs with few
   KV blocks: one that preempts, and the host-store policies' (--host-runs: histories back from the host
   DRAM store, layer-wise and load-first; `ssd`, `ssd_load_first`: from the SSD tier, DRAM bypassed, session
   files under --ssd-dir, `gpu.batched_ssd`). -> turns.csv (per turn: TTFT, TPOT), steps.csv (per step: shape, static
   key, wall, GPU and load times, SSD bytes read and written), traces.csv (the slices served)
4. comparison (`gpu.batched_validate`): every step priced by the cost model as the simulator's
   ChunkedReplica prices it, and each trace replayed by the same loop and scheduler on the cost
   model's clock, once per profile of --profile (label=path, comma-separated: the one calibrated in
   this call and the committed one). -> compare.json; a table per profile printed last.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu.batched import (ATTENTION_KINDS, BatchedExecutor, random_model, serve_sessions)  # noqa: E402
from gpu.calibrate import host_step_from_served, host_step_from_steps, iteration_from_raw  # noqa: E402
from gpu.batched_validate import (POLICIES, compare_turns, csv_path, phase_summary, predict_steps,  # noqa: E402
                                  scatter_plot, scheduler_for,
                                  simulate_sessions, step_summary, steps_frame, trace_sessions, turns_frame)
from gpu.trace_slice import make_slice  # noqa: E402
from gpu.model import TINY  # noqa: E402
from gpu.tp_layer import TINY_GQA  # noqa: E402
from sim.files import atomic_write, atomic_write_json  # noqa: E402
from sim.models import MODELS  # noqa: E402
from sim.scheduler import SeqRequest, StepPlan, Scheduled  # noqa: E402
from sim.trace import read_trace  # noqa: E402

T0 = time.perf_counter()
# --host-runs: mode -> (policy, layer-wise)
HOST_RUNS = {"layerwise": ("dram", True), "load_first": ("dram", False), "ssd": ("ssd", True),
             "ssd_load_first": ("ssd", False)}
# --model -> (--base-profile, --replay-profile) defaults: the newest H100 profile with the model's tables
# (LLaMA-2-7B's has no iteration section: its first replay composes the per-layer tables)
PROFILES = {"llama3.1-8b": ("results/gpu/run14_llama31_8b_h100/profile_h100_llama31_8b.yaml",
                            "results/gpu/run19_batched_graphs/profile_calibrated.yaml"),
            "llama2-7b": ("results/gpu/run12_copy_overhead/profile.yaml",
                          "results/gpu/run12_copy_overhead/profile.yaml")}


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def slices(a, shape, seed=None, rates=None) -> dict:
    """rate -> the canonical trace served at that rate (sessions/s over --window-s); `seed` (default
    --seed) picks the sessions."""
    src = read_trace(a.source)
    out = {}
    seed = a.seed if seed is None else seed
    for rate in (a.rates if rates is None else rates):
        n = max(2, int(round(rate * a.window_s)))
        t = make_slice(src, n, a.max_turns, a.output_cap, min(a.max_session_tokens, shape.max_context_tokens - 8),
                       session_gap_s=1.0 / rate, think_mean_s=a.think_mean_s, seed=seed)
        out[rate] = t
    return out


# ---- stage 1: attention kinds -------------------------------------------------------------------------

def synthetic_plan(shape_spec, bt, num_blocks, vocab, rng):
    """A step of `decodes` requests holding `ctx` tokens each and optionally one prefill chunk of
    `chunk` new tokens after `cached` ones, over distinct random blocks."""
    decodes, ctx, chunk, cached = shape_spec
    return synthetic_step([ctx] * decodes, [(chunk, cached)] if chunk else [], bt, num_blocks, vocab, rng)


def synthetic_step(ctxs, chunks, bt, num_blocks, vocab, rng):
    """A step of decode rows holding `ctxs` tokens each (after it) and prefill chunks `[(new, cached)]`,
    over distinct random blocks."""
    reqs, sched = [], []
    free = list(rng.permutation(np.arange(1, num_blocks + 1)))

    def make(rid, prompt, computed, new, out_tokens):
        r = SeqRequest(rid, prompt, 10_000, lambda i: (rid, i))
        r.num_output_tokens = out_tokens
        nb = -(-(computed + new) // bt)
        r.blocks = [int(free.pop()) for _ in range(nb)]
        r.num_computed_tokens = computed
        toks = rng.integers(0, vocab, prompt + out_tokens).tolist()
        reqs.append((r, toks))
        sched.append(Scheduled(r, new, out_tokens > 0 and new == 1))
    for i, ctx in enumerate(ctxs):
        make(("d", i), ctx - 1, ctx - 1, 1, 1)     # ctx - 1 cached, its last sampled token to compute
    for j, (chunk, cached) in enumerate(chunks):
        make(("c", j), cached + chunk, cached, chunk, 0)
    return StepPlan(sched, [], {}, 0), reqs


def attention_bench(model, a, bt, num_blocks, cuda) -> tuple[str, pd.DataFrame]:
    specs = [tuple(int(v) for v in s.split("x")) for s in a.bench_shapes.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    for spec in specs:
        plan, reqs = synthetic_plan(spec, bt, num_blocks, model.shape.vocab, rng)
        ref = None
        for kind in ATTENTION_KINDS:
            if kind != "sdpa" and not cuda and kind != "flash_varlen":
                continue
            ex = BatchedExecutor(model, num_blocks, bt, attention=kind, kv=shared_kv)
            for r, toks in reqs:
                ex.tokens[r] = list(toks)   # prompt and outputs so far (add() takes prompts only)
            row = {"decodes": spec[0], "ctx": spec[1], "chunk": spec[2], "cached": spec[3], "attention": kind}
            try:
                logits = ex.run(plan, keep_logits=True).logits
                for r, toks in reqs:
                    ex.tokens[r] = list(toks)   # undo the sample, so every repetition is the same step
                if ref is None:
                    ref = logits
                err = float((logits - ref).norm() / ref.norm())
                times = []
                for i in range(a.bench_reps + 2):
                    out = ex.run(plan)
                    for r, toks in reqs:
                        ex.tokens[r] = list(toks)
                    if i >= 2:
                        times.append(out.gpu_ms)
                row.update(rel_err=err, ok=bool(err < 5e-2 and math.isfinite(err)), median_ms=float(np.median(times)),
                           min_ms=float(np.min(times)))
            except Exception as exc:   # a kind this torch or this block size does not support
                row.update(rel_err=math.nan, ok=False, median_ms=math.nan, error=repr(exc)[:300])
            rows.append(row)
            log(f"attention {kind:12s} {spec}: {row.get('median_ms', math.nan):.3f} ms err {row.get('rel_err')}")
    df = pd.DataFrame(rows)
    good = df[df.ok]
    total = good.groupby("attention").median_ms.sum()
    complete = good.groupby("attention").size() == len(specs)
    total = total[complete[complete].index] if complete.any() else total
    return (str(total.idxmin()) if len(total) else "sdpa"), df


# ---- stage 1b: decode graphs against the eager path ---------------------------------------------------

def graph_bench(ex, model, a, bt, num_blocks, attention) -> pd.DataFrame:
    """Pure-decode steps of each shape run by an eager executor and by `ex` (graphs), on the same KV
    cache: host-clock median over --bench-reps (what the serving loop waits for), and the relative
    error of the graph's logits against the eager ones."""
    eager = BatchedExecutor(model, num_blocks, bt, attention=attention, kv=shared_kv, decode_graphs=False)
    rng = np.random.default_rng(2)
    rows = []
    for spec in filter(None, a.graph_bench_shapes.split(",")):
        dec, _, chunk = spec.partition("+")     # "BxC" or "BxC+N:H" (a chunk of N new after H cached)
        b, c = (int(v) for v in dec.split("x"))
        n, h = (int(v) for v in chunk.split(":")) if chunk else (0, 0)
        if b * (c + bt) + n + h + bt > 0.95 * num_blocks * bt:
            continue
        plan, reqs = synthetic_step([c] * b, [(n, h)] if n else [], bt, num_blocks, model.shape.vocab, rng)
        row = {"decodes": b, "ctx": c, "chunk": n, "cached": h, "attention": attention}
        logits = {}
        for name, e in (("eager", eager), ("graph", ex)):
            walls, gpus = [], []
            for i in range(a.bench_reps + 2):
                for r, toks in reqs:
                    e.tokens[r] = list(toks)
                t = time.perf_counter()
                out = e.run(plan, keep_logits=i == 0)
                w = (time.perf_counter() - t) * 1e3
                if i == 0:
                    logits[name] = out.logits
                    row[f"{name}_graph"] = bool(out.graph)
                if i >= 2:
                    walls.append(w)
                    gpus.append(out.gpu_ms)
            row[f"{name}_ms"] = float(np.median(walls))
            row[f"{name}_gpu_ms"] = float(np.median(gpus))
            for r, _ in reqs:
                e.tokens.pop(r, None)
        row["rel_err"] = float((logits["graph"] - logits["eager"]).norm() / logits["eager"].norm())
        rows.append(row)
        log(f"step {b:4d} x {c:5d} + {n:4d}:{h:<5d}: eager {row['eager_ms']:.2f} ms, graph {row['graph_ms']:.2f} ms "
            f"(gpu {row['eager_gpu_ms']:.2f} / {row['graph_gpu_ms']:.2f}), err {row['rel_err']:.2e}")
    return pd.DataFrame(rows)


# ---- stage 2: the iteration calibration ------------------------------------------------------------------

def _ints(s) -> list[int]:
    return [int(v) for v in str(s).split(",") if v != ""]


def calibration_specs(a, capacity_tokens: int, max_pos: int) -> list[dict]:
    """The synthetic steps to time: every (decodes, ctx, chunk, cached) whose KV fits the cache and whose
    positions the model's rotary tables hold."""
    rows = [dict(kind="decode", batch=b, context_tokens=c, new_tokens=0, history_tokens=0)
            for b in _ints(a.calib_decode_batch) for c in _ints(a.calib_decode_ctx)]
    rows += [dict(kind="chunk", batch=0, context_tokens=0, new_tokens=n, history_tokens=h)
             for n in _ints(a.calib_chunk_new) for h in _ints(a.calib_chunk_hist)]
    for m in a.calib_mixed.split(","):
        if m:
            n, h, b, c = (int(v) for v in m.split("x"))
            rows.append(dict(kind="mixed", batch=b, context_tokens=c, new_tokens=n, history_tokens=h))
    # block rounding: each request holds whole blocks
    return [r for r in rows if r["batch"] * (r["context_tokens"] + 16) + r["new_tokens"] + r["history_tokens"] + 16
            <= 0.95 * capacity_tokens and max(r["context_tokens"], r["new_tokens"] + r["history_tokens"]) < max_pos]


def time_step(ex, plan, reqs, reps: int, align=None, idle_ratio: float = 0.0):
    """Run one synthetic step `reps` + 1 times (the first a warm-up), each from the same token state:
    (wall ms, GPU ms) of the timed runs and the last run's result. `align`: called before each run (a
    tensor-parallel call's ranks start each sample together). `idle_ratio`: after each run the GPU idles
    that many times its wall time (`gpu.bench.time_cuda_ms`'s reason: back-to-back samples of large steps
    run power-capped, at a lower SM clock than served steps; run 31's log: 1,862-1,949 MHz calibrating,
    1,965-1,980 serving)."""
    walls, gpus = [], []
    for i in range(reps + 1):
        for r, toks in reqs:
            ex.tokens[r] = list(toks)   # undo the last sample: every repetition is the same step
        if align is not None:
            align()
        t = time.perf_counter()
        out = ex.run(plan)
        w = (time.perf_counter() - t) * 1e3
        if i:
            walls.append(w)
            gpus.append(out.gpu_ms)
        if idle_ratio > 0:
            time.sleep(idle_ratio * w / 1e3)
    for r, _ in reqs:
        ex.tokens.pop(r, None)
    return walls, gpus, out


def calibrate_iteration(ex, model, a, bt, num_blocks, align=None) -> pd.DataFrame:
    """Each spec run as one step of `ex` (warm-up first), its median time over --calib-reps: `ms` on the
    host clock around `ex.run` (the step's layout, launches and the wait for its sampled tokens: what the
    serving loop waits for), `gpu_ms` on CUDA events."""
    rng = np.random.default_rng(1)
    rows = []
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for spec in calibration_specs(a, num_blocks * bt, model.rope_cos.shape[0]):
            plan, reqs = synthetic_plan((spec["batch"], spec["context_tokens"], spec["new_tokens"],
                                         spec["history_tokens"]), bt, num_blocks, model.shape.vocab, rng)
            walls, gpus, out = time_step(ex, plan, reqs, a.calib_reps, align, a.calib_idle_ratio)
            rows.append(dict(spec, ms=float(np.median(walls)), gpu_ms=float(np.median(gpus)),
                             min_ms=float(np.min(walls)), reps=len(walls), key=_key_str(out.key)))
            log(f"calibration {spec['kind']:6s} B={spec['batch']:<4d} ctx={spec['context_tokens']:<5d} "
                f"new={spec['new_tokens']:<5d} hist={spec['history_tokens']:<5d}: {rows[-1]['ms']:.2f} ms "
                f"(gpu {rows[-1]['gpu_ms']:.2f})")
    finally:
        if was:
            gc.enable()
    return pd.DataFrame(rows)


def _key_str(key) -> str:
    return ":".join(map(str, key)) if key else ""


# ---- stage 2b: the runs' own step shapes ----------------------------------------------------------------

def slice_args(ap) -> None:
    """The options of the ShareGPT sessions a call serves (`slices`), the same for the TP validation."""
    ap.add_argument("--source", default="traces/sharegpt_small.parquet")
    ap.add_argument("--window-s", type=float, default=12.0, help="sessions start within this window")
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--output-cap", type=int, default=512)
    ap.add_argument("--max-session-tokens", type=int, default=4000)
    ap.add_argument("--think-mean-s", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)


def host_calib_args(ap) -> None:
    """The served host-time run's options (`host_calibration`), the same for the TP validation."""
    ap.add_argument("--host-calib-s", type=float, default=0.0,
                    help="seconds of a served run (other sessions: --seed + 1, the top rate) whose steps give the "
                         "profile's loop host time per step (0: the CPU replay's; see host_calibration)")
    ap.add_argument("--host-calib-warmup-s", type=float, default=2.0,
                    help="seconds served and discarded before the --host-calib-s run (one-time host costs)")
    ap.add_argument("--host-calib-policy", default="hbm", choices=("recompute", "hbm", "dram"),
                    help="the policy of the --host-calib-s run")


def calib_idle_arg(ap) -> None:
    """--calib-idle-ratio (`time_step`'s idle_ratio), the same for the TP validation."""
    ap.add_argument("--calib-idle-ratio", type=float, default=0.0,
                    help="after each calibration sample the GPU idles this many times the sample's time (time_step)")


def idle_sleep(dt_s: float) -> None:
    """The serving loop's wait for its next arrival: a young-generation collection when there is time for
    one (the collector is off during runs), then sleep to ~1 ms before the target and spin (time.sleep
    overshoots by up to a scheduler tick)."""
    if dt_s > 0.02:
        gc.collect(1)
    end = time.perf_counter() + dt_s
    while True:
        rem = end - time.perf_counter()
        if rem <= 0:
            return
        time.sleep(rem - 0.001 if rem > 0.002 else 0)


def run_list(a, num_blocks) -> list[tuple]:
    """(rate, policy, KV blocks, layer-wise) of every run, in the order they are served: saturation
    first (the load the issue is about), then the preempting run and the host-store runs (few KV blocks,
    so histories leave HBM and come back from the host: layer-wise, then load-first), then lighter loads;
    a short budget drops the last."""
    pols = a.policies.split(",")
    top = max(a.rates)
    runs = [(top, pol, num_blocks, True) for pol in pols]
    if a.preempt_blocks:
        runs.append((top, "hbm", a.preempt_blocks, True))
    for spec in filter(None, a.host_runs.split(",")):
        mode = spec.strip()
        if mode not in HOST_RUNS:
            raise SystemExit(f"--host-runs: {mode!r}, expected some of {', '.join(HOST_RUNS)}")
        pol, layerwise = HOST_RUNS[mode]
        runs.append((top, pol, a.preempt_blocks or num_blocks, layerwise))
    runs += [(rate, pol, num_blocks, True) for rate in sorted(a.rates, reverse=True)[1:] for pol in pols]
    return runs


def run_name(rate, pol, nb, layerwise, num_blocks) -> str:
    return (f"{pol}_r{rate:g}" + ("_preempt" if nb != num_blocks else "")
            + ("" if layerwise else "_loadfirst"))


def replay_shapes(cost, traces, runs, bt, padding, max_batched_tokens, max_seqs, stop_s=math.inf):
    """Every run's trace served by the executor's loop and scheduler on `cost`'s clock (no GPU): the
    steps it predicts, as the executor's static shapes. Returns (shapes: key -> {count, rep: (decode
    contexts total, batch, chunks, longest decode context)} with the step of median keys as `rep`, the
    replay's step table, its runs in order, each starting at step 0)."""
    from gpu.batched_validate import parse_chunks
    frames, found = [], {}
    for rate, pol, nb, layerwise in runs:
        res = simulate_sessions(cost, traces[rate], pol, nb, block_tokens=bt, max_batched_tokens=max_batched_tokens,
                                max_seqs=max_seqs, layerwise=layerwise, stop_s=stop_s)
        st = steps_frame(res)
        if not len(st):
            continue
        frames.append(st)
        for c, b, x, mx in zip(st.chunks, st.decodes, st.decode_ctx, st.decode_max_ctx):
            ch = parse_chunks(c)
            k = padding.key(ch, int(b), int(x))
            if k is not None:
                found.setdefault(k, []).append((int(x), int(b), ch, int(mx)))
    shapes = {}
    for k, steps in found.items():
        steps.sort(key=lambda s: s[0] + sum(h for _, h in s[2]))
        shapes[k] = {"count": len(steps), "rep": steps[len(steps) // 2]}
    return shapes, (pd.concat(frames) if frames else pd.DataFrame())


def shape_at_keys(rep, key, padding, max_pos: int):
    """`rep` (decode contexts total, batch, chunks) moved to `key`'s key count: its gathered keys set to
    the middle of the key bucket (through the decode contexts, or the first chunk's cached tokens
    without decodes), None when no such step fits the positions. Same batch and chunks."""
    ctx, b, chunks = rep[:3]
    kb = padding.keys
    i = kb.index(key[2])
    target = (kb[i - 1] + key[2] + 1) // 2 if i else (key[2] + 1) // 2
    now = ctx + (key[0] - b) + (sum(h for _, h in chunks) + key[1] if chunks else 0)
    d = target - now
    if b:
        ctx += d
        if ctx < b or -(-ctx // b) > max_pos - 1:
            return None
    else:
        (n, h), rest = chunks[0], chunks[1:]
        if h + d < 0 or h + d + n > max_pos:
            return None
        chunks = [(n, h + d)] + list(rest)
    out = (ctx, b, chunks) + tuple(rep[3:])
    return out if padding.key(chunks, b, ctx) == tuple(key) else None


def shape_plan(rep):
    """Per-row decode contexts summing to the total, and the chunks. With the longest context given
    (a replayed step's), one row holds it and the others share the rest evenly: the attention kernel
    waits for its longest row, so uniform rows would time a step faster than the runs' (run 23:
    graph replays of the same shape took 4-6% longer in the runs than in a uniform calibration)."""
    ctx, b, chunks = rep[:3]
    if not b:
        return [], chunks
    longest = rep[3] if len(rep) > 3 else 0
    longest = min(max(longest, -(-ctx // b)), ctx - (b - 1))
    if b == 1 or longest <= -(-ctx // b):
        return [ctx // b + (1 if i < ctx % b else 0) for i in range(b)], chunks
    rest, n = ctx - longest, b - 1
    return [longest] + [rest // n + (1 if i < rest % n else 0) for i in range(n)], chunks


def calibrate_shapes(ex, model, a, bt, num_blocks, todo, budget_s, align=None, agree=None) -> list[dict]:
    """Each (key, rep) of `todo`, in order, captured (with chunks: listed as a shape the executor has) and
    timed as one step of `ex` (host clock around `run`, median of --shape-reps after a warm-up), until
    `budget_s`. Rows of kind "step" for `gpu.calibrate.iteration_from_raw`. Tensor parallelism: `align`
    starts each sample on every rank together, `agree` makes rank 0's budget decision everyone's."""
    rng = np.random.default_rng(3)
    rows = []
    t0 = time.perf_counter()
    was = gc.isenabled()
    gc.collect()
    gc.freeze()      # each capture collects: frozen objects make that quick
    gc.disable()
    try:
        for key, rep in todo:
            spent = time.perf_counter() - t0 > budget_s
            if agree(spent) if agree is not None else spent:
                log(f"shape calibration: budget spent, {len(todo) - len(rows)} shapes left")
                break
            ctxs, chunks = shape_plan(rep)
            if sum(c + bt for c in ctxs) + sum(n + h + bt for n, h in chunks) > 0.95 * num_blocks * bt:
                continue
            if key[1] and ex.static.chunk_shapes is not None:
                ex.static.chunk_shapes.add(tuple(key))
            ex.static.capture([tuple(key)], collect=False)
            plan, reqs = synthetic_step(ctxs, chunks, bt, num_blocks, model.shape.vocab, rng)
            walls, gpus, out = time_step(ex, plan, reqs, a.shape_reps, align, a.calib_idle_ratio)
            if out.key != tuple(key):
                log(f"shape calibration: {key} ran as {out.key}, dropped")
                if ex.static.chunk_shapes is not None:
                    ex.static.chunk_shapes.discard(tuple(key))
                continue
            rows.append(dict(kind="step", batch=len(ctxs), context_tokens=sum(ctxs) / max(len(ctxs), 1),
                             new_tokens=sum(n for n, _ in chunks), history_tokens=sum(h for _, h in chunks),
                             chunks=";".join(f"{n}:{h}" for n, h in chunks), key=_key_str(key),
                             ms=float(np.median(walls)), gpu_ms=float(np.median(gpus)), min_ms=float(np.min(walls)),
                             reps=len(walls)))
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
    log(f"shape calibration: {len(rows)} shapes in {time.perf_counter() - t0:.1f} s "
        f"({len(ex.static.captured)} graphs captured)")
    return rows


def shape_todo(shapes, padding, max_pos, done=()) -> list:
    """The replay's shapes not yet timed, most frequent first, then each shape-with-chunks' next key
    count (a step of that batch and chunk tokens with a few more keys than replayed runs there)."""
    done = set(done)
    first = [(k, v["rep"]) for k, v in sorted(shapes.items(), key=lambda kv: -kv[1]["count"]) if k not in done]
    seen = set(done) | {k for k, _ in first}
    after = []
    for k, rep in first:
        if not k[1]:
            continue
        i = padding.keys.index(k[2])
        if i + 1 < len(padding.keys):
            nk = (k[0], k[1], padding.keys[i + 1])
            if nk not in seen:
                moved = shape_at_keys(rep, nk, padding, max_pos)
                if moved is not None:
                    seen.add(nk)
                    after.append((nk, moved))
    return first + after


def calibrated_profile(base: Path, model_name: str, raw: pd.DataFrame, out: Path, padding=None,
                       host_step=None) -> Path:
    """--base-profile with this call's `iteration` section for `model_name`, checked by the cost model's
    own parser before it is written."""
    import yaml
    from sim.costmodel import parse_profile
    prof = yaml.safe_load(Path(base).read_text())
    if model_name not in prof.get("models", {}):
        raise SystemExit(f"{base}: models: no tables for {model_name!r} to add the iteration section to")
    rows = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
            for r in raw.to_dict("records")]
    it = iteration_from_raw(rows, padding)
    if host_step is not None:
        it["host_step_ms"] = host_step
    prof["models"][model_name]["iteration"] = it
    prof["command"] = f"{prof.get('command', '')}; iteration: {sys.argv[0]} " + " ".join(sys.argv[1:])
    import torch
    if torch.cuda.is_available():   # the section's machine, which need not be the base's (run 29: H200 over H100)
        here = torch.cuda.get_device_name(0)
        if here != prof.get("device"):
            prof["device"] = f"{here} (iteration section); other tables: {prof.get('device')} ({base})"
    parse_profile(prof, str(out))
    atomic_write(out, lambda tmp: Path(tmp).write_text(
        "# base profile + the batched executor's iteration section (bench/gpu_batched_validate.py)\n"
        + yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=200)))
    return out


# ---- stage 3: runs --------------------------------------------------------------------------------------

def serve_frozen(ex, sched, sessions, stop_s: float, clock=None):
    """`serve_sessions` with the collector frozen and off: a full collection inside a step would stall it
    by tens of ms (results/gpu/README.md). `clock`: the loop's clock (tensor parallelism: rank 0's)."""
    was = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        kw = {} if clock is None else {"clock": clock}
        return serve_sessions(ex, sched, sessions, sleep=idle_sleep, stop_s=stop_s, **kw)
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def host_calibration_trace(a, shape) -> pd.DataFrame | None:
    """The sessions of the --host-calib-s run: other sessions than the validation's (--seed + 1) at the top
    rate; None without that run."""
    if a.host_calib_s <= 0:
        return None
    top = max(a.rates)
    return slices(a, shape, seed=a.seed + 1, rates=[top])[top]


def host_calibration(ex, a, shape, trace, bt, num_blocks, out: Path | None, clock=None) -> dict | None:
    """The serving loop's host time per step as served (`gpu.calibrate.host_step_from_served`): one run of
    --host-calib-s seconds of `trace` (`host_calibration_trace`) with --host-calib-policy, before the
    validation runs, its steps written to `out` (None: not written, a TP rank other than 0). None where it
    gave no bin of >= 3 steps."""
    top = max(a.rates)
    ex.reset()
    ex.layerwise = True
    ex.use_ssd(None)
    sched = scheduler_for(a.host_calib_policy, num_blocks, bt, a.max_batched_tokens, a.max_seqs,
                          shape.max_context_tokens, ex.external_tokens)
    if a.host_calib_warmup_s > 0:
        # one-time host costs (first finished turn, first admissions: run 33's calibration run spent 16 ms in
        # the loop around its first finish, 0.5 s in) are paid by a discarded warm-up on the same sessions
        serve_frozen(ex, sched, trace_sessions(trace), a.host_calib_warmup_s, clock)
        ex.reset()
        sched = scheduler_for(a.host_calib_policy, num_blocks, bt, a.max_batched_tokens, a.max_seqs,
                              shape.max_context_tokens, ex.external_tokens)
    res = serve_frozen(ex, sched, trace_sessions(trace), a.host_calib_s, clock)
    steps = steps_frame(res).assign(run="host_calibration", policy=a.host_calib_policy, rate=top)
    if out is not None:
        write_csv(steps, out / "host_calib_steps.csv")
    ex.reset()
    return host_step_from_served(steps)


shared_kv = None   # (K, V) of the KV cache, allocated once for every executor of the call


def main():
    global shared_kv
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, few requests, on CPU")
    ap.add_argument("--compare", help="only the comparison, from a folder of returned files")
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--profile", default=None,
                    help="hardware profiles for the comparison, comma-separated, each PATH or LABEL=PATH; "
                         "'calibrated' is this call's profile_calibrated.yaml (default: roofline; on a device "
                         "run with calibration: calibrated and --base-profile)")
    ap.add_argument("--base-profile", default=None,
                    help="the profile the calibrated iteration section is added to (default: --model's in PROFILES)")
    ap.add_argument("--no-calibration", action="store_true", help="skip the iteration calibration")
    ap.add_argument("--skip-attn-bench", action="store_true", help="with --attention given: no micro-benchmark")
    ap.add_argument("--calib-decode-batch", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--calib-decode-ctx", default="128,512,1024,2048,4096", help="tokens per sequence")
    ap.add_argument("--calib-chunk-new", default="16,64,256,512,1024,2048,4096,8192")
    ap.add_argument("--calib-chunk-hist", default="0,1024,2048,4096")
    ap.add_argument("--calib-mixed", default="32x0x8x1024,64x2048x32x512,256x0x16x1024,512x1024x4x2048,"
                                             "1024x0x32x1024,2048x0x64x512,128x4096x48x768",
                    help="chunk x cached x decodes x ctx, comma-separated")
    ap.add_argument("--calib-reps", type=int, default=3)
    calib_idle_arg(ap)
    ap.add_argument("--replay-profile", default=None,
                    help="the profile whose clock the first replay of the runs' traces runs on (the shapes to "
                         "time; default: --model's in PROFILES); '' for no replay (no shape calibration)")
    ap.add_argument("--shape-calib-s", type=float, default=75.0, help="time for the first replay's shapes")
    ap.add_argument("--shape-calib2-s", type=float, default=25.0,
                    help="time for the shapes the second replay (on the calibrated profile) adds")
    ap.add_argument("--shape-reps", type=int, default=5, help="timed repetitions of each replayed shape")
    ap.add_argument("--host-runs", default="layerwise,load_first",
                    help="runs at the top rate on --preempt-blocks KV blocks whose histories come back from the "
                         "host: the DRAM store (layerwise, load_first) or the SSD tier with DRAM bypassed (ssd, "
                         "ssd_load_first), comma-separated")
    ap.add_argument("--ssd-dir", default=None,
                    help="the SSD tier's session files (default /tmp/kvsim_ssd, on the machine's local disk; "
                         "--cpu-smoke: a temporary folder)")
    ap.add_argument("--gpu-name", default=None, help="the simulator's GPU (default: from the device name)")
    ap.add_argument("--rates", default="0.5,2,6", help="session arrivals per second, light load to saturation")
    ap.add_argument("--policies", default="recompute,hbm,dram",
                    help=f"policies served at every rate on the whole KV cache, some of {', '.join(POLICIES)} (the "
                         f"SSD tier's runs: --host-runs)")
    slice_args(ap)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--kv-gb", type=float, default=30.0, help="HBM for the paged KV cache")
    ap.add_argument("--preempt-blocks", type=int, default=1500, help="KV blocks of the preempting run (0: none)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--attention", default="auto", choices=("auto",) + ATTENTION_KINDS)
    ap.add_argument("--bench-shapes", default="32x1024x0x0,128x1024x0x0,32x1024x2048x1024,0x0x4096x0",
                    help="decodes x ctx x chunk x cached, comma-separated")
    ap.add_argument("--bench-reps", type=int, default=5)
    ap.add_argument("--decode-graphs", default="auto", choices=("auto", "on", "off"),
                    help="pure-decode steps as CUDA graphs at batch buckets (auto: on; on CPU the same static "
                         "body runs eagerly)")
    ap.add_argument("--graph-capture-s", type=float, default=90.0,
                    help="time for capturing decode graphs ahead; the rest are captured when first used")
    ap.add_argument("--graph-bench-shapes", default="1x512,32x1024,128x1024,0x0+512:0,32x1024+48:512,"
                                                    "16x1024+1000:2000",
                    help="decodes x ctx [+ chunk:cached] of the eager-vs-graph comparison, comma-separated "
                         "('' for none)")
    ap.add_argument("--host-step-per-pool", action="store_true",
                    help="comparison: each run priced with the loop's host time reduced from the replay of the "
                         "runs on its number of KV blocks only (see pool_profiles)")
    host_calib_args(ap)
    ap.add_argument("--run-limit-s", type=float, default=35.0, help="a run stops at this time on its clock")
    ap.add_argument("--budget-s", type=float, default=290.0, help="no run starts after this wall time")
    a = ap.parse_args()
    a.rates = [float(r) for r in a.rates.split(",")]
    base, replay = PROFILES.get(a.model, (None, ""))
    if a.base_profile is None:
        if base is None:
            raise SystemExit(f"--model {a.model}: no default --base-profile (one of {', '.join(PROFILES)}); name one")
        a.base_profile = base
    if a.replay_profile is None:
        a.replay_profile = replay
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.compare:
        return compare(Path(a.compare), a, out)
    if a.cpu_smoke:
        # a few sessions of at most 120 tokens (30 blocks of 4) arriving at once: the preempting run's
        # 34 blocks hold one or two of them, and a session's next turn (0.3 s later on average) finds its
        # history evicted from HBM by the others' now and then (the host runs load it back)
        a.rates, a.think_mean_s = [4.0, 8.0], 0.3
        a.window_s, a.output_cap, a.max_session_tokens, a.max_turns = 0.5, 6, 120, 2
        a.bench_shapes, a.bench_reps, a.preempt_blocks, a.run_limit_s = "4x40x0x0,2x40x24x16", 1, 34, 20.0
        a.calib_decode_batch, a.calib_decode_ctx, a.calib_chunk_new, a.calib_chunk_hist = "1,4", "8,32", "8,24", "0,16"
        a.calib_mixed, a.calib_reps = "8x0x2x16,8x16x4x8", 1
        a.graph_bench_shapes = "3x16,4x40,2x16+9:12"
        a.shape_reps = 1
        a.host_calib_s = a.host_calib_s or 5.0
        if "ssd" not in a.host_runs.split(","):
            a.host_runs = ",".join(filter(None, [a.host_runs, "ssd"]))
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    big = MODELS[a.model]
    # the smoke's tiny shape keeps --model's attention: multi-head (LLaMA-2) or grouped-query
    shape = big if not a.cpu_smoke else (TINY if big.kv_heads == big.heads else TINY_GQA)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "argv": sys.argv, "model": shape.name,
            "args": {k: v for k, v in vars(a).items()}}
    atomic_write_json(out / "env.json", info)
    log(f"device {info['device']} torch {torch.__version__} model {shape.name}")

    traces = slices(a, shape)
    write_csv(pd.concat([t.assign(rate=r) for r, t in traces.items()]), out / "traces.csv")
    bt = a.block_tokens if not a.cpu_smoke else 4
    # positions of the runs' sessions and of the calibration's longest chunk after its longest history
    calib_pos = max(_ints(a.calib_chunk_new)) + max(_ints(a.calib_chunk_hist)) + 64
    max_pos = shape.max_context_tokens if a.cpu_smoke else min(shape.max_context_tokens,
                                                                max(a.max_session_tokens + 4096, calib_pos))
    model = random_model(shape, max_pos, dev, dtype, seed=1)
    kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * model.dtype.itemsize
    num_blocks = 200 if a.cpu_smoke else int(a.kv_gb * 1e9 // (bt * kv_token))
    shp = (shape.layers, num_blocks + 1, bt, shape.kv_heads, shape.head_dim)
    shared_kv = (torch.zeros(shp, device=dev, dtype=dtype), torch.zeros(shp, device=dev, dtype=dtype))
    log(f"weights and {num_blocks} KV blocks of {bt} tokens ready")

    attention = a.attention
    if attention == "auto" or (cuda and not a.skip_attn_bench):
        best, bench = attention_bench(model, a, bt, num_blocks, cuda)
        write_csv(bench, out / "attn_bench.csv")
        if attention == "auto":
            attention = best if cuda else "sdpa"
    info["attention"] = attention
    atomic_write_json(out / "env.json", info)
    log(f"attention kind for the runs: {attention}")

    # each session reserves ceil((its tokens + one block) / bt) host blocks (`open_session`), in every run
    # the call serves (the host-time calibration's included)
    calib_trace = host_calibration_trace(a, shape)
    all_traces = list(traces.values()) + ([calib_trace] if calib_trace is not None else [])
    host_blocks = max(sum(-(-(int(g.prompt_tokens.sum() + g.output_tokens.sum()) + bt) // bt)
                          for _, g in t.groupby("session_id")) for t in all_traces) + 8
    graphs = a.decode_graphs != "off"
    ex = BatchedExecutor(model, num_blocks, bt, attention=attention, host_blocks=host_blocks, kv=shared_kv,
                         decode_graphs=graphs)
    log(f"host store: {host_blocks} blocks ({host_blocks * bt * kv_token / 1e9:.1f} GB pinned)")
    ssd_dir, ssd_tmp = a.ssd_dir, None
    if ssd_dir is None:
        import tempfile
        ssd_dir = ssd_tmp = tempfile.mkdtemp(prefix="kvsim_ssd_") if a.cpu_smoke else "/tmp/kvsim_ssd"
    # the SSD tier's pinned staging: a slot holds four sessions' longest history (grown if a step loads more)
    ssd_staging = 4 * max(-(-(int(g.prompt_tokens.sum() + g.output_tokens.sum()) + bt) // bt)
                          for t in traces.values() for _, g in t.groupby("session_id"))
    if graphs:
        ex.static.capture(log=log, budget_s=a.graph_capture_s)
        if a.graph_bench_shapes:
            write_csv(graph_bench(ex, model, a, bt, num_blocks, attention), out / "graph_bench.csv")
        info["decode_graphs"] = graph_info(ex)
        atomic_write_json(out / "env.json", info)

    runs = run_list(a, num_blocks)
    if not a.no_calibration:
        raw = calibrate_iteration(ex, model, a, bt, num_blocks)
        cm_name = shape.name if shape.name in MODELS else a.model
        prof_path = out / "profile_calibrated.yaml"
        pad, host_step = None, None
        if ex.static is not None and a.replay_profile:
            # the shapes the runs will run: their traces replayed on this host by the executor's loop and
            # scheduler, first on --replay-profile's clock, then on the profile calibrated from those
            pad = ex.static.padding
            max_pos = ex.static.max_pos
            gpu = a.gpu_name or ("h200" if "H200" in info["device"] else "h100-80gb")
            # shapes with chunks exist where captured: the grid's (run above) and those timed below
            ex.static.chunk_shapes = {tuple(int(v) for v in k.split(":")) for k in raw.key
                                      if isinstance(k, str) and k and int(k.split(":")[1])}
            rows, done, replays = [], set(), []
            for label, prof, budget in (("replay 1", a.replay_profile, a.shape_calib_s),
                                        ("replay 2", str(prof_path), a.shape_calib2_s)):
                t = time.perf_counter()
                shapes, rsteps = replay_shapes(cost_model(a.model, prof, gpu), traces, runs, bt, pad,
                                               a.max_batched_tokens, a.max_seqs, a.run_limit_s)
                todo = shape_todo(shapes, pad, max_pos, done)
                log(f"{label} ({prof}): {len(rsteps)} steps, {len(shapes)} shapes "
                    f"({sum(1 for k in shapes if k[1])} with chunks), {len(todo)} to time, "
                    f"{time.perf_counter() - t:.1f} s")
                replays.append(rsteps.assign(replay=label))
                rows += calibrate_shapes(ex, model, a, bt, num_blocks, todo, budget)
                done |= {tuple(int(v) for v in r["key"].split(":")) for r in rows} | {k for k, _ in todo}
                rs = pd.concat(replays)
                host_step = host_step_from_steps(rs.decodes + rs.chunks.fillna("").str.count(":"), rs.loop_ms)
                raw_all = pd.concat([raw, pd.DataFrame(rows)], ignore_index=True)
                calibrated_profile(Path(a.base_profile), cm_name, raw_all, prof_path, pad, host_step)
            write_csv(pd.concat(replays), out / "replay_steps.csv")
            raw = raw_all
            log(f"loop host time per step: {host_step}")
        else:
            calibrated_profile(Path(a.base_profile), cm_name, raw, prof_path)
        write_csv(raw, out / "iteration_raw.csv")
        ex.reset()
        if a.host_calib_s > 0:
            served = host_calibration(ex, a, shape, calib_trace, bt, num_blocks, out)
            if served is not None:
                # the served loop's host time replaces the CPU replay's (kept in replay_steps.csv)
                host_step = served
                calibrated_profile(Path(a.base_profile), cm_name, raw, prof_path, pad, host_step)
            log(f"loop host time per step, served ({a.host_calib_s:.0f} s, {a.host_calib_policy} at "
                f"{max(a.rates)}/s, seed {a.seed + 1}): {served}")
        log(f"calibrated profile: {len(raw)} step shapes -> {prof_path}")
        if a.profile is None:
            a.profile = f"calibrated,committed={a.base_profile}"

    all_turns, all_steps = [], []
    for rate, pol, nb, layerwise in runs:
        name = run_name(rate, pol, nb, layerwise, num_blocks)
        if time.perf_counter() - T0 > a.budget_s:
            log(f"budget spent: run {name} skipped")
            continue
        ex.reset()
        ex.layerwise = layerwise
        ex.use_ssd(ssd_dir if pol == "ssd" else None, ssd_staging)
        if ex.ssd is not None:
            info.setdefault("ssd", {})[name] = {"dir": str(ssd_dir), "o_direct": ex.ssd.direct,
                                                "staging_blocks": ssd_staging}
            atomic_write_json(out / "env.json", info)
        sched = scheduler_for(pol, nb, bt, a.max_batched_tokens, a.max_seqs, shape.max_context_tokens,
                              ex.external_tokens)
        t_run = time.perf_counter()
        res = serve_frozen(ex, sched, trace_sessions(traces[rate]), a.run_limit_s)
        turns, steps = turns_frame(res), steps_frame(res)
        # the run's time 0 on the wall clock, to line steps up with the GPU's clock and power log (smi.csv)
        epoch0 = time.time() - time.perf_counter() + res.t0
        meta = dict(run=name, policy=pol, rate=rate, num_blocks=nb, block_tokens=bt, attention=attention,
                    model=shape.name, layerwise=layerwise, epoch0_s=round(epoch0, 4))
        all_turns.append(turns.assign(**meta))
        all_steps.append(steps.assign(**meta))
        write_csv(pd.concat(all_turns), out / "turns.csv")
        write_csv(pd.concat(all_steps), out / "steps.csv")
        B = steps.decodes.mean() if len(steps) else 0
        n_chunk = int((steps.chunk_tokens > 0).sum()) if len(steps) else 0
        n_cg = int(((steps.chunk_tokens > 0) & steps.graph).sum()) if len(steps) else 0
        log(f"run {name}: {len(turns)}/{len(traces[rate])} turns, {len(steps)} steps "
            f"({int(steps.graph.sum()) if len(steps) else 0} at static shapes; with chunks {n_cg}/{n_chunk}, "
            f"{int(steps.captured.sum()) if len(steps) else 0} captured in the run, "
            f"{int((steps.ext_tokens > 0).sum()) if len(steps) else 0} with host loads), "
            f"{sched.stats.preemptions} preemptions, mean decode batch {B:.1f}, "
            f"TTFT p50 {turns.ttft_s.median() * 1e3:.1f} ms, TPOT p50 {turns.tpot_s.median() * 1e3:.2f} ms, "
            f"{time.perf_counter() - t_run:.1f} s")
        if ex.ssd is not None and len(steps):
            rd = steps.ssd_read_bytes.sum()
            log(f"run {name}: SSD read {rd / 1e6:.1f} MB in {int((steps.ssd_read_bytes > 0).sum())} steps "
                f"({rd / max(steps.ssd_read_ms.sum(), 1e-9) / 1e6:.2f} GB/s over the reads' spans, "
                f"{steps.ssd_wait_ms.sum():.0f} ms waiting for writes), wrote {steps.ssd_write_bytes.sum() / 1e6:.1f} MB "
                f"(writer busy {ex.ssd.write_busy_ms / 1e3:.1f} s), o_direct {ex.ssd.direct}")
    ex.drain()
    ex.use_ssd(None)   # the last SSD run's files removed
    if ssd_tmp is not None:
        import shutil
        shutil.rmtree(ssd_tmp, ignore_errors=True)
    if graphs:
        info["decode_graphs"] = graph_info(ex)
        atomic_write_json(out / "env.json", info)
        log(f"decode graphs: {info['decode_graphs']}")
    compare(out, a, out, device=info["device"])


def graph_info(ex) -> dict:
    st = ex.static
    p = st.padding
    return {"captured": len(st.captured), "capture_s": round(st.capture_s, 2), "replays": st.replays,
            "captured_in_runs": st.captured_in_run, "eager_static_steps": st.eager_steps, "failed": st.failed,
            "chunk_failed": st.chunk_failed,
            "on_cuda": st.graphs, "chunk_shapes": None if st.chunk_shapes is None else len(st.chunk_shapes),
            "batch_buckets": list(p.batch), "chunk_buckets": list(p.chunk_tokens), "key_buckets": list(p.keys),
            "chunk_slots": p.chunk_slots}


# ---- stage 4: the comparison ----------------------------------------------------------------------------

def cost_model(model: str, profile, gpu_name: str, gpus: int = 1, allreduce_table=None):
    """The simulator's cost model of `gpus` GPUs: `profile`'s tables, or (none) the roofline, which charges
    tensor-parallel all-reduces from `allreduce_table` where one is given."""
    from sim.config import load_config
    from sim.costmodel import build_cost_model
    cfg = {"model": model, "gpu": {"name": gpu_name, "count": gpus}}
    if profile:
        cfg["hardware_profile"] = str(profile)
    elif allreduce_table and gpus > 1:
        cfg["gpu"].update(allreduce="table", allreduce_table=str(allreduce_table))
    return build_cost_model(load_config(cfg))


def profile_list(spec, folder: Path) -> list[tuple[str, str | None]]:
    """--profile as (label, path) pairs: PATH or LABEL=PATH, 'calibrated' for the call's own profile;
    none: the roofline."""
    if not spec:
        return [("roofline", None)]
    out = []
    for item in spec.split(","):
        label, _, path = item.partition("=") if "=" in item else (Path(item).stem, "", item)
        if item == "calibrated":
            label, path = "calibrated", str(folder / "profile_calibrated.yaml")
        out.append((label, path))
    return out


def pool_profiles(folder: Path, profile, label: str, model: str, out: Path) -> dict:
    """KV blocks -> a copy of `profile` whose loop host time per step (`host_step_ms`) is reduced from
    the call's replay (replay_steps.csv) of the runs on that many blocks only. The scheduler's host
    time grew with the free blocks until 38996e0 (a count over the free queue at every allocation),
    so the pooled reduction undercharged the runs on the large cache. Written as
    profile_<label>_pool<blocks>.yaml."""
    import argparse
    env = json.loads((folder / "env.json").read_text())
    ns = argparse.Namespace(**env["args"])
    st = pd.read_csv(csv_path(folder, "steps.csv"), usecols=["num_blocks"])
    runs = run_list(ns, int(st.num_blocks.max()))
    name = csv_path(folder, "replay_steps.csv").name
    rs = pd.read_csv(folder / name, keep_default_na=False, na_values=[""])
    pools = []
    for _, g in rs.groupby("replay", sort=False):
        idx = (g.step.to_numpy() == 0).cumsum() - 1      # each replayed run starts at step 0, in run order
        pools.append(pd.Series([runs[i][2] for i in idx], index=g.index))
    rs["num_blocks"] = pd.concat(pools)
    paths = {}
    for nb, g in rs.groupby("num_blocks"):
        host = host_step_from_steps(g.decodes + g.chunks.fillna("").str.count(":"), g.loop_ms)
        if host is None:
            continue
        paths[int(nb)] = with_host_step(Path(profile), model, host, out / f"profile_{label}_pool{nb}.yaml")
    return paths


def with_host_step(profile: Path, model: str, host_step: dict, out: Path, note: str = "") -> Path:
    """A copy of `profile` whose `models.<model>.iteration.host_step_ms` is `host_step`, written atomically to
    `out` (`note`: appended to its `command`)."""
    import yaml
    prof = yaml.safe_load(Path(profile).read_text())
    it = prof.get("models", {}).get(model, {}).get("iteration")
    if it is None:
        raise SystemExit(f"{profile}: models.{model}.iteration: missing; expected a batched profile with an "
                         f"iteration section")
    it["host_step_ms"] = host_step
    if note:
        prof["command"] = f"{prof.get('command', '')}; {note}"
    atomic_write(out, lambda tmp: Path(tmp).write_text(
        yaml.safe_dump(prof, sort_keys=False, default_flow_style=None, width=200)))
    return out


def ssd_table_gbps(cost, pred: pd.DataFrame) -> float:
    """The profile's SSD read rate over a run's SSD reads: each request's per-layer read looked up in the
    read table at its size (the executor reads a request's layer with one pread), bytes over summed times."""
    from gpu.batched_validate import parse_ext
    per_tok = cost.shape.kv_bytes_per_token_layer
    nbytes = secs = 0.0
    for e in pred.ext[pred.ssd_read_bytes > 0]:
        for n in parse_ext(e):
            if n:
                b = n * per_tok
                nbytes += b
                secs += b / cost.ssd_read_bw(b)
    return nbytes / secs / 1e9 if secs else math.nan


def compare(folder: Path, a, out: Path, device: str | None = None, gpus: int = 1, allreduce_table=None) -> None:
    """Per-step and whole-trace comparison of a call's files with each cost model of --profile (roofline
    unless one is given) over `gpus` GPUs (tensor parallel: `bench/gpu_tp_batched_validate.py`, whose
    roofline charges its all-reduces from `allreduce_table`). The tiny smoke model has no cost model of its
    own: --model's prices it. compare.json: one summary per profile, under its label."""
    steps = pd.read_csv(csv_path(folder, "steps.csv"), keep_default_na=False, na_values=[""])
    turns = pd.read_csv(csv_path(folder, "turns.csv"))
    traces = pd.read_csv(folder / "traces.csv")
    if device is None:
        device = json.loads((folder / "env.json").read_text()).get("device", "")
    gpu = a.gpu_name or ("h200" if "H200" in device else "h100-80gb")
    model = steps.model.iloc[0] if steps.model.iloc[0] in MODELS else a.model
    bt = int(steps.block_tokens.iloc[0])
    result = {}
    for label, profile in profile_list(a.profile, folder):
        cost = cost_model(model, profile, gpu, gpus, allreduce_table)
        summary = {"cost_model": type(cost).__name__, "profile": profile, "gpu": gpu, "model": model,
                   "iteration_section": bool(getattr(getattr(cost, "m", None), "iteration", None)), "runs": {}}
        by_pool = {}
        if a.host_step_per_pool and summary["iteration_section"] and profile:
            paths = pool_profiles(folder, profile, label, model, out)
            by_pool = {nb: cost_model(model, path, gpu, gpus) for nb, path in paths.items()}
            summary["host_step_per_pool"] = {str(nb): str(p) for nb, p in paths.items()}
        table = []
        joined = {}
        for run, st in steps.groupby("run", sort=False):
            layerwise = bool(st.layerwise.iloc[0]) if "layerwise" in st else True
            cost = by_pool.get(int(st.num_blocks.iloc[0]), cost)
            pred = predict_steps(st, cost, layerwise=layerwise)
            row = {"run": run, **step_summary(pred)}
            if row.get("ssd_steps"):
                row["ssd_read_gbps_table"] = ssd_table_gbps(cost, pred)
            tr = turns[turns.run == run]
            pol, rate, nb = tr.policy.iloc[0], float(tr.rate.iloc[0]), int(tr.num_blocks.iloc[0])
            trace = traces[traces.rate == rate].drop(columns=["rate"])
            trace = trace[trace.session_id.isin(set(tr.session_id))]
            res = simulate_sessions(cost, trace, pol, nb, block_tokens=bt, layerwise=layerwise,
                                    max_batched_tokens=a.max_batched_tokens, max_seqs=a.max_seqs)
            sim = turns_frame(res)
            j, s = compare_turns(tr, sim)
            row.update(s)
            joined[run] = (j, f"{run}: {pol}, {rate:g} sessions/s, mean batch {row.get('mean_batch', math.nan):.1f}")
            row.update(phase_summary(tr, st, sim, steps_frame(res)))
            summary["runs"][run] = row
            table.append(row)
        result[label] = summary
        scatter_plot(joined, out / f"scatter_{label}.png",
                     f"{folder.name}: {device}, {model}; simulated ({label} profile) vs measured")
        cols = ["run", "mean_batch", "preemptions", "decode_wall_mape", "mixed_wall_mape", "ttft_mape", "tpot_mape",
                "ttft_mean_err", "ttft_p99_err", "throughput_err", "ft_step_mape", "ttft_mape_same_wait",
                "ssd_steps", "ssd_wall_mape", "ssd_read_gbps", "ssd_read_gbps_table"]
        df = pd.DataFrame(table)
        log(f"comparison with {label}: {summary['cost_model']} ({model}, {gpu}, {profile}):")
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format",
                               "{:.3f}".format):
            print(df[[c for c in cols if c in df.columns]].to_string(index=False), flush=True)
    atomic_write_json(out / "compare.json", result)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
