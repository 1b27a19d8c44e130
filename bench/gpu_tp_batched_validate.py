"""One device call: the batched executor under tensor parallelism (gpu/tp_batched.py) serves ShareGPT
sessions with Llama-3.1-70B at TP 4, and the simulator's chunked scheduler and cost model, calibrated in
the same call, predict the same runs (issue 16, item 5; the single-GPU call is bench/gpu_batched_validate.py).

On the 4-GPU machine (bench/gpu_run27_tp4_batched.sh):
    PYTHONPATH=. python3 bench/gpu_tp_batched_validate.py --out /tmp/r27
On CPU, the same path on 2 gloo processes with a tiny GQA model and a few requests:
    python bench/gpu_tp_batched_validate.py --cpu-smoke --out /tmp/smoke
Afterwards, on CPU, the comparison again from the returned files:
    python bench/gpu_tp_batched_validate.py --compare DIR --out DIR2 [--profile LABEL=PATH,...]

One process per GPU (torch.multiprocessing.spawn; NVLink multicast off in every one, `gpu.tp_bench.start_rank`);
NCCL's world group is the TP group, a gloo group carries host-side agreement (budget decisions, the replay's
shapes, rank rows to rank 0), and a shared-memory file carries rank 0's clock and the plan checks
(`gpu.tp_batched.ShmSync`; `--sync gloo` for broadcasts instead). Stages in order, each writing its files as
it ends (the launcher's `timeout` still returns what is done), with what matters first:
1. the two syncs timed (microseconds a step pays to agree) -> env.json `sync_cost`
2. the TP check: a small GQA model's scripted steps (chunks with decodes, a prefix hit) by the sharded executor
   at static shapes (CUDA graphs holding the all-reduces) against one unsharded executor -> env.json `tp_check`
3. NCCL all-reduce at this TP degree over message sizes, eager and as CUDA graphs (`gpu.tp_bench`, run 13's
   method) -> allreduce.csv, allreduce_h100.yaml (the table the roofline is compared with)
4. iteration calibration: the single-GPU script's grid of synthetic steps, then the shapes a CPU replay of the
   runs predicts (replayed on the grid's own profile, then on the profile with those shapes), each sample
   started on every rank together and the slowest rank's median kept; decode graphs captured ahead while
   budget is left -> iteration_raw.csv, replay_steps.csv, profile_calibrated.yaml (the base TP profile's
   tables, tp 4, plus this call's `iteration` section)
5. runs: each rate (a light one, one with a mean decode batch >= 16) x policy (recompute, hbm prefix caching),
   --run-limit-s each, heaviest first -> turns.csv, steps.csv, traces.csv
6. comparison (rank 0; `gpu.batched_validate`, the single-GPU script's `compare` at this TP degree): per step
   and whole trace (TTFT and TPOT MAPE, mean and p99 TTFT, throughput) against the calibrated profile and the
   roofline with the measured all-reduce table -> compare.json, scatter_*.png
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gpu_batched_validate as gbv  # noqa: E402
from gpu.batched import random_model, serve_sessions  # noqa: E402
from gpu.batched_validate import POLICIES, scheduler_for, steps_frame, trace_sessions, turns_frame  # noqa: E402
from gpu.calibrate import host_step_from_steps  # noqa: E402
from gpu.batched import BatchedExecutor  # noqa: E402
from gpu.tp_batched import (SYNCS, GlooSync, ShmSync, TPBatchedExecutor, all_reduce_sum,  # noqa: E402
                            scripted_logits, sync_cost_us)
from gpu.tp_bench import (MIB, NO_MULTICAST_ENV, HostGroup, Rank, RunArgs, allreduce_sizes, allreduce_table,  # noqa: E402
                          combine_allreduce, free_port, measure_allreduce, start_rank, write_table_yaml)
from gpu.tp_layer import TINY_GQA  # noqa: E402
from sim.costmodel import load_profile  # noqa: E402
from sim.files import atomic_write_json  # noqa: E402
from sim.models import MODELS, ModelShape  # noqa: E402

BASE_PROFILE = "results/gpu/run21_tp4/profile_tp4.yaml"
# the device check's model: GQA whose 8 KV heads split over 2, 4 or 8 ranks, head_dim 64 (a flash size)
CHECK_SHAPE = ModelShape("tp-check", layers=4, hidden=1024, heads=16, kv_heads=8, intermediate=2048, vocab=4096,
                         max_context_tokens=4096)
# run 21's NCCL table at TP 4: the roofline's all-reduces where this call's degree is not the simulated one
# (the CPU smoke run's 2 ranks priced as 4 GPUs)
COMMITTED_ALLREDUCE = "results/gpu/run21_tp4/allreduce_h100.yaml"


# ---- pure helpers -------------------------------------------------------------------------------------

def slowest_rows(parts: list[list[dict]]) -> list[dict]:
    """Each rank's rows of one calibration (the same samples in the same order) -> one row per sample: rank
    0's, its times the slowest rank's (a TP step ends with it); `ms_fastest_rank` keeps the spread."""
    n = len(parts[0])
    if any(len(p) != n for p in parts):
        raise ValueError(f"ranks timed {[len(p) for p in parts]} samples: they must time the same ones")
    out = []
    for i in range(n):
        row = dict(parts[0][i])
        for k in ("ms", "gpu_ms", "min_ms"):
            if k in row:
                row[k] = max(float(p[i][k]) for p in parts)
        row["ms_fastest_rank"] = min(float(p[i]["ms"]) for p in parts)
        out.append(row)
    return out


def shape_budget_s(left_s: float, runs: int, run_s: float, compare_s: float, want_s: float) -> float:
    """Seconds the shape calibration may take: what it asks, less whatever the runs (each `run_s`) and the
    comparison after it need of the `left_s` seconds left; never below 0."""
    return max(0.0, min(want_s, left_s - runs * run_s - compare_s))


def roofline_table(folder: Path, world: int, sim_gpus: int) -> Path:
    """The all-reduce table the roofline is compared with: this call's, measured at `world` GPUs, when that
    is the simulated degree; run 21's TP-4 table otherwise."""
    own = Path(folder) / "allreduce_h100.yaml"
    return own if world == sim_gpus and own.exists() else Path(COMMITTED_ALLREDUCE)


# ---- one rank -------------------------------------------------------------------------------------------

class Ctx(HostGroup):
    """A rank's view of the call: rank 0's decisions and rows, its log, the budget on rank 0's clock."""

    def __init__(self, rank: int, world: int, a, host, start_wall: float):
        super().__init__(rank, world, host, start_wall, a.budget_s)
        self.a = a


def tp_check(c: Ctx, sync, cuda: bool, dev, dtype) -> dict:
    """The sharded executor against the unsharded one on the GPU, before anything is timed: a small GQA
    model's scripted steps (`gpu.tp_batched.scripted_logits`: chunks with decodes, a prefix hit) run by the
    TP executor at static shapes (on the GPU: CUDA graphs holding the NCCL all-reduces) on every rank, and
    by one unsharded eager executor on rank 0. Returns (on rank 0) the logits' relative error, whether
    every rank's logits are the same bits (their sampled tokens must be), and the graphs captured."""
    shape, scale, bt = (CHECK_SHAPE, 8, 16) if cuda else (TINY_GQA, 1, 4)
    kind = "flash_varlen" if cuda else "sdpa"
    model = random_model(shape, 1024, dev, dtype, seed=5, rank=c.rank, tp=c.world)
    model.reduce = all_reduce_sum
    ex = TPBatchedExecutor(model, 64, bt, sync, attention=kind, decode_graphs=True)
    logits, shapes, hit = scripted_logits(ex, budget=10 * scale, scale=scale)
    digest = zlib_bytes(logits)
    graphs = {"captured": len(ex.static.captured), "failed": ex.static.failed, "chunk_failed": ex.static.chunk_failed}
    del ex, model
    digests = c.gather(digest)
    if c.rank != 0:
        return {}
    ref, ref_shapes, _ = scripted_logits(BatchedExecutor(random_model(shape, 1024, dev, dtype, seed=5), 64, bt,
                                                         attention=kind, decode_graphs=False),
                                         budget=10 * scale, scale=scale)
    err = float((logits - ref).norm() / ref.norm())
    tol = 5e-2 if cuda else 1e-5
    return {"model": shape.name, "steps": len(shapes), "prefix_hit_tokens": hit, "rel_err": err, "tolerance": tol,
            "same_steps": shapes == ref_shapes, "ranks_identical": len(set(digests)) == 1,
            "passed": bool(err < tol and shapes == ref_shapes and len(set(digests)) == 1), "graphs": graphs}


def zlib_bytes(t: torch.Tensor) -> int:
    import zlib
    return zlib.crc32(t.detach().float().cpu().numpy().tobytes())


def rank_main(rank: int, world: int, a, shm_path: str) -> None:
    trace_line, cuda = start_rank(rank, a.port, a.start_wall, a.cpu_smoke)
    trace_line("init")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=a.init_timeout_s))
    host = dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=max(a.init_timeout_s, 300)))
    c = Ctx(rank, world, a, host, a.start_wall)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.all_reduce(torch.ones(1, device=dev))       # the NCCL communicator is made by its first collective
    trace_line("groups up, first all-reduce done")
    # the single-GPU script's stages log through its module's `log`: rank 0's lines only, on this call's clock
    gbv.log = c.log
    syncs = {"shm": ShmSync(shm_path, rank, world, timeout_s=a.sync_timeout_s), "gloo": GlooSync(host, rank, world)}
    try:
        run_call(c, a, cuda, dev, dtype, syncs)
    except Exception:
        print(f"[rank {rank}] FAILED\n{traceback.format_exc()}", flush=True)
        raise
    finally:
        syncs["shm"].close()
    c.log("done")
    dist.barrier(group=host)
    if cuda:
        # every file is written: leave without tearing NCCL down. Run 29 hung here for 166 s after "done"
        # (until the call's timeout) with its communicator still captured in the ranks' CUDA graphs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def run_call(c: Ctx, a, cuda: bool, dev, dtype, syncs: dict) -> None:   # noqa: C901 - the call's stages in order
    rank, world = c.rank, c.world
    out = Path(a.out)
    shape = MODELS[a.model] if not a.cpu_smoke else TINY_GQA
    base = load_profile(a.base_profile)
    if cuda and base.tp != world:
        raise SystemExit(f"{a.base_profile}: tp: {base.tp}, expected this call's {world} GPUs")
    sim_gpus = base.tp                        # the smoke run's 2 ranks are priced as the profile's TP degree
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda, "world": world,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": shape.name, "command": a.command,
            "env": {k: os.environ.get(k) for k in (*NO_MULTICAST_ENV, "PYTHONHASHSEED")},
            "args": {k: v for k, v in vars(a).items()}, "stages_s": {}}
    if cuda:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))

    def save_info():
        if rank == 0:
            atomic_write_json(out / "env.json", info)

    def stage_done(name, t0):
        info["stages_s"][name] = round(time.time() - t0, 2)
        save_info()
        c.log(f"{name}: done in {time.time() - t0:.1f} s")

    save_info()

    # 1. what agreeing costs a step, each way (every rank runs both, the checks keep them together)
    t = time.time()
    costs = {name: sync_cost_us(s, calls=100 if a.cpu_smoke else 1000) for name, s in syncs.items()}
    got = c.gather(costs)
    if rank == 0:
        info["sync_cost"] = {name: {k: round(max(g[name][k] for g in got), 2) for k in got[0][name]} for name in syncs}
        c.log(f"sync cost per call (slowest rank): {info['sync_cost']}")
    # ShmSync's ordering argument is x86's (stores seen in program order); elsewhere the ranks use gloo
    if a.sync == "shm" and platform.machine() not in ("x86_64", "AMD64"):
        c.log(f"{platform.machine()}: the ranks agree over gloo, not shared memory")
        a.sync = "gloo"
    sync = syncs[a.sync]
    info["sync"] = a.sync
    stage_done("sync", t)

    # 2. the sharded executor computes what the unsharded one does (graphs with all-reduces included)
    t = time.time()
    info["tp_check"] = tp_check(c, sync, cuda, dev, dtype)
    if rank == 0:
        c.log(f"TP check: {info['tp_check']}" + ("" if info["tp_check"]["passed"] else "  <-- FAILED"))
    if cuda:
        torch.cuda.empty_cache()
    stage_done("tp check", t)

    t = time.time()
    traces = c.agree(gbv.slices(a, shape) if rank == 0 else None)
    if rank == 0:
        gbv.write_csv(pd.concat([tr.assign(rate=r) for r, tr in traces.items()]), out / "traces.csv")
    bt = a.block_tokens if not a.cpu_smoke else 4
    calib_pos = max(gbv._ints(a.calib_chunk_new)) + max(gbv._ints(a.calib_chunk_hist)) + 64
    max_pos = shape.max_context_tokens if a.cpu_smoke else min(shape.max_context_tokens,
                                                                max(a.max_session_tokens + 4096, calib_pos))
    # weights drawn on the GPU (seconds for 70B), the rank's shard of one model, embedding and LM head whole
    model = random_model(shape, max_pos, dev, dtype, seed=1, rank=rank, tp=world)
    model.reduce = all_reduce_sum
    kv_token = 2 * shape.layers * model.shape.kv_heads * shape.head_dim * dtype.itemsize
    num_blocks = 200 if a.cpu_smoke else int(a.kv_gb * 1e9 // (bt * kv_token))
    if cuda:
        torch.cuda.synchronize()
    c.log(f"{shape.name} TP {world}: a rank holds {model.shape.heads} heads / {model.shape.kv_heads} KV heads / "
          f"{model.shape.intermediate} MLP columns x {shape.layers} layers and {num_blocks} KV blocks of {bt} tokens"
          + (f"; {torch.cuda.memory_allocated() / 1e9:.1f} GB on GPU 0" if cuda else ""))
    stage_done("weights", t)

    # 3. the NCCL all-reduce table at this degree (graphs up to 4 MiB, as run 13/21)
    t = time.time()
    tb = Rank(rank, world, RunArgs(str(out), a.budget_s, a.start_wall, (), (world,), a.cpu_smoke, a.port, a.command),
              cuda, dev, dtype, c.host, {world: dist.group.WORLD})
    sizes = allreduce_sizes(hi=64 * MIB, hidden=shape.hidden) if cuda else [1024, 4096]
    rows = c.gather(measure_allreduce(tb, world, sizes, graph_max_bytes=4 * MIB, samples=7 if cuda else 2,
                                      use_graph=cuda))
    table_path = out / "allreduce_h100.yaml"
    if rank == 0:
        comb = combine_allreduce([x for part in rows for x in part])
        gbv.write_csv(pd.DataFrame(comb), out / "allreduce.csv")
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_table_yaml(allreduce_table(comb, info["device"], stamp, a.command), table_path)
        mode = "graph" if cuda else "eager"
        c.log("all-reduce: " + ", ".join(f"{x['bytes'] >> 10} KiB {x['us']:.1f} us" for x in comb
                                         if x["mode"] == mode and x["bytes"] in (16 << 10, 256 << 10, 1 << 20, 4 << 20)))
    stage_done("allreduce", t)

    # 4. the executor and its calibration
    attention = "flash_varlen" if cuda else "sdpa"     # run 25's kind; steps at static shapes use it always
    info["attention"] = attention
    ex = TPBatchedExecutor(model, num_blocks, bt, sync, check_every=a.check_every, attention=attention,
                           decode_graphs=True)
    runs = gbv.run_list(a, num_blocks)
    run_s = a.run_limit_s + a.run_slack_s
    t = time.time()
    align = lambda: sync.check(0)     # noqa: E731 - every rank starts each sample together
    got = c.gather(gbv.calibrate_iteration(ex, model, a, bt, num_blocks, align).to_dict("records"))
    cm_name = shape.name if shape.name in MODELS else a.model
    prof_path = out / "profile_calibrated.yaml"
    pad, max_pos = ex.static.padding, ex.static.max_pos
    keys = None
    if rank == 0:
        raw = pd.DataFrame(slowest_rows(got))
        gbv.calibrated_profile(Path(a.base_profile), cm_name, raw, prof_path, pad)
        gbv.write_csv(raw, out / "iteration_raw.csv")
        keys = {tuple(int(v) for v in k.split(":")) for k in raw.key if isinstance(k, str) and k}
    # shapes with chunks exist where captured: the grid's (the same keys on every rank)
    ex.static.chunk_shapes = {k for k in c.agree(keys) if k[1]}
    stage_done("grid", t)
    gpu = a.gpu_name or ("h200" if "H200" in info["device"] else "h100-80gb")
    rows, done, replays, host_step = [], set(), [], None
    for label, want in (("replay 1", a.shape_calib_s), ("replay 2", a.shape_calib2_s)):
        t = time.time()
        todo = None
        if rank == 0:
            shapes, rsteps = gbv.replay_shapes(gbv.cost_model(a.model, prof_path, gpu, sim_gpus), traces, runs, bt, pad,
                                               a.max_batched_tokens, a.max_seqs, a.run_limit_s)
            todo = gbv.shape_todo(shapes, pad, max_pos, done)
            replays.append(rsteps.assign(replay=label))
            c.log(f"{label}: {len(rsteps)} steps, {len(shapes)} shapes ({sum(1 for k in shapes if k[1])} with chunks), "
                  f"{len(todo)} to time, {time.time() - t:.1f} s")
        todo = c.agree(todo)
        budget = c.agree(shape_budget_s(c.left_s(), len(runs), run_s, a.compare_s + a.graph_capture_s, want))
        mine = gbv.calibrate_shapes(ex, model, a, bt, num_blocks, todo, budget, align, c.agree)
        got = c.gather(mine)
        if rank == 0:
            rows += slowest_rows(got)
            rs = pd.concat(replays)
            host_step = host_step_from_steps(rs.decodes + rs.chunks.fillna("").str.count(":"), rs.loop_ms)
            raw_all = pd.concat([raw, pd.DataFrame(rows)], ignore_index=True)
            gbv.calibrated_profile(Path(a.base_profile), cm_name, raw_all, prof_path, pad, host_step)
            gbv.write_csv(raw_all, out / "iteration_raw.csv")
            gbv.write_csv(rs, out / "replay_steps.csv")
            done |= {tuple(int(v) for v in r["key"].split(":")) for r in rows} | {k for k, _ in todo}
        stage_done(label, t)
    if rank == 0:
        c.log(f"loop host time per step: {host_step}")
    # the loop's host time as served (gbv.host_calibration, on rank 0's clock like the runs), where the runs'
    # time is kept
    calib_trace = gbv.host_calibration_trace(a, shape)
    calib_s = a.host_calib_s + a.host_calib_warmup_s + run_s - a.run_limit_s
    if calib_trace is not None and c.agree(c.left_s() - len(runs) * run_s - a.compare_s > calib_s):
        t = time.time()
        served = gbv.host_calibration(ex, a, shape, calib_trace, bt, num_blocks, out if rank == 0 else None,
                                      clock=sync.clock)
        if rank == 0:
            if served is not None:
                host_step = served
                gbv.calibrated_profile(Path(a.base_profile), cm_name, raw_all, prof_path, pad, host_step)
            c.log(f"loop host time per step, served ({a.host_calib_s:.0f} s, {a.host_calib_policy} at "
                  f"{max(a.rates)}/s, seed {a.seed + 1}): {served}")
        stage_done("host calibration", t)

    # decode graphs ahead (the likeliest first) while the runs' time is kept
    t = time.time()
    for key in ex.static.decode_keys():
        if not c.agree(c.left_s() - len(runs) * run_s - a.compare_s > 0 and time.time() - t < a.graph_capture_s):
            break
        ex.static.capture([key], collect=False)
    info["graphs"] = gbv.graph_info(ex)
    stage_done("decode graphs", t)

    # 5. runs, heaviest load first
    all_turns, all_steps = [], []
    for rate, pol, nb, layerwise in runs:
        name = gbv.run_name(rate, pol, nb, layerwise, num_blocks)
        if not c.agree(c.left_s() > run_s + a.compare_s):
            c.log(f"budget spent: run {name} skipped")
            continue
        t = time.time()
        ex.reset()
        ex.layerwise = layerwise
        sched = scheduler_for(pol, nb, bt, a.max_batched_tokens, a.max_seqs, shape.max_context_tokens,
                              ex.external_tokens)
        was = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()    # a full collection inside a step would stall it by tens of ms (results/gpu/README.md)
        try:
            res = serve_sessions(ex, sched, trace_sessions(traces[rate]), clock=sync.clock, sleep=gbv.idle_sleep,
                                 stop_s=a.run_limit_s)
        finally:
            gc.unfreeze()
            if was:
                gc.enable()
        if rank == 0:
            turns, steps = turns_frame(res), steps_frame(res)
            meta = dict(run=name, policy=pol, rate=rate, num_blocks=nb, block_tokens=bt, attention=attention,
                        model=shape.name, layerwise=layerwise, tp=world)
            all_turns.append(turns.assign(**meta))
            all_steps.append(steps.assign(**meta))
            gbv.write_csv(pd.concat(all_turns), out / "turns.csv")
            gbv.write_csv(pd.concat(all_steps), out / "steps.csv")
            n = len(steps)
            c.log(f"run {name}: {len(turns)}/{len(traces[rate])} turns, {n} steps "
                  f"({int(steps.graph.sum()) if n else 0} at static shapes, "
                  f"{int(steps.captured.sum()) if n else 0} captured in the run), {sched.stats.preemptions} "
                  f"preemptions, mean decode batch {steps.decodes.mean() if n else 0:.1f}, "
                  f"TTFT p50 {turns.ttft_s.median() * 1e3:.1f} ms, TPOT p50 {turns.tpot_s.median() * 1e3:.2f} ms")
        stage_done(f"run {name}", t)
    ex.drain()
    info["graphs"] = gbv.graph_info(ex)
    # every check passed (a failed one raises on every rank): how many the ranks made
    info["checks"] = {"sync": a.sync, "checks": sync.k_check, "check_every": a.check_every, "steps": ex.steps}
    mem = c.gather(round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else 0.0)
    if rank == 0:
        info["max_memory_gb"] = mem
    save_info()

    # 6. the comparison, on rank 0 (the others wait at the closing barrier)
    if rank == 0 and all_steps:
        t = time.time()
        a.profile = a.profile or "calibrated,roofline="
        gbv.compare(out, a, out, device=info["device"], gpus=sim_gpus, allreduce_table=roofline_table(out, world, sim_gpus))
        stage_done("compare", t)


# ---- the launcher -----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="2 gloo processes, tiny GQA model, few requests")
    ap.add_argument("--compare", help="only the comparison, from a folder of returned files")
    ap.add_argument("--gpus", type=int, default=0, help="ranks = TP degree (0: every GPU; 2 with --cpu-smoke)")
    ap.add_argument("--model", default="llama3.1-70b")
    ap.add_argument("--base-profile", default=BASE_PROFILE,
                    help="the TP profile (its tp = the GPUs) the calibrated iteration section is added to")
    ap.add_argument("--profile", default=None,
                    help="profiles for the comparison, comma-separated, each PATH or LABEL=PATH; 'calibrated' is "
                         "this call's; LABEL= (no path) the roofline with this call's all-reduce table "
                         "(default: calibrated,roofline=)")
    ap.add_argument("--sync", default="shm", choices=SYNCS, help="how ranks agree on the clock and check plans")
    ap.add_argument("--check-every", type=int, default=1, help="compare the ranks' plan digests every N steps")
    ap.add_argument("--sync-timeout-s", type=float, default=300.0, help="a rank waiting longer for the others fails")
    ap.add_argument("--init-timeout-s", type=float, default=120.0, help="NCCL timeout: a hung collective ends the run")
    ap.add_argument("--calib-decode-batch", default="1,4,16,64")
    ap.add_argument("--calib-decode-ctx", default="128,1024,4096", help="tokens per sequence")
    ap.add_argument("--calib-chunk-new", default="16,256,1024,2048")
    ap.add_argument("--calib-chunk-hist", default="0,2048")
    ap.add_argument("--calib-mixed", default="64x2048x16x512,512x1024x4x2048,1024x0x16x1024",
                    help="chunk x cached x decodes x ctx, comma-separated")
    ap.add_argument("--calib-reps", type=int, default=3)
    gbv.calib_idle_arg(ap)
    gbv.host_calib_args(ap)
    ap.add_argument("--shape-calib-s", type=float, default=100.0,
                    help="time for the first replay's shapes (less where the runs would not fit the budget)")
    ap.add_argument("--shape-calib2-s", type=float, default=25.0, help="time for the shapes the second replay adds")
    ap.add_argument("--shape-reps", type=int, default=4)
    ap.add_argument("--graph-capture-s", type=float, default=15.0, help="decode graphs captured ahead after that")
    ap.add_argument("--gpu-name", default=None, help="the simulator's GPU (default: from the device name)")
    # the simulator's roofline at TP 4 (run 21's all-reduce table) puts these 22-s runs' mean decode batch at
    # ~7 and ~27 (20-25 ms TPOT); a faster real step lowers it, so the top load keeps a margin over 16
    ap.add_argument("--rates", default="1,4", help="session arrivals per second: a light load and one whose "
                                                   "mean decode batch is >= 16")
    ap.add_argument("--policies", default="recompute,hbm")
    gbv.slice_args(ap)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--kv-gb", type=float, default=20.0, help="HBM for the paged KV cache, per GPU")
    # a 70B step of 2048 new tokens takes ~0.1 s at TP 4: longer chunks would stall the decodes they ride with
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--run-limit-s", type=float, default=22.0, help="a run stops at this time on its clock")
    ap.add_argument("--run-slack-s", type=float, default=6.0, help="a run's time beyond its limit (set-up, drain)")
    ap.add_argument("--compare-s", type=float, default=25.0, help="time kept for the comparison at the end")
    ap.add_argument("--budget-s", type=float, default=380.0, help="wall budget from launch: stages and runs that "
                                                                  "would end past it are cut or skipped")
    return ap


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    a.rates = [float(r) for r in a.rates.split(",")]
    a.preempt_blocks, a.host_runs, a.host_step_per_pool = 0, "", False   # gbv.run_list / compare: no such runs
    for pol in a.policies.split(","):
        if pol not in POLICIES:
            raise SystemExit(f"--policies: {pol!r}, expected some of {', '.join(POLICIES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.compare:
        folder = Path(a.compare)
        env = json.loads((folder / "env.json").read_text())
        a.profile = a.profile or f"calibrated={folder / 'profile_calibrated.yaml'},roofline="
        gpus = load_profile(env["args"]["base_profile"]).tp
        return gbv.compare(folder, a, out, gpus=gpus, allreduce_table=roofline_table(folder, env["world"], gpus))
    if a.cpu_smoke:
        # a few sessions of at most 120 tokens (30 blocks of 4) arriving within half a second
        a.rates, a.think_mean_s, a.window_s, a.output_cap, a.max_session_tokens, a.max_turns = [4.0, 8.0], 0.02, 0.5, 6, 120, 2
        a.calib_decode_batch, a.calib_decode_ctx, a.calib_chunk_new, a.calib_chunk_hist = "1,4", "8,32", "8,24", "0,16"
        a.calib_mixed, a.calib_reps, a.shape_reps, a.run_limit_s, a.max_batched_tokens = "8x0x2x16", 1, 1, 3.0, 64
        a.host_calib_s = a.host_calib_s or 2.0
        a.shape_calib_s, a.shape_calib2_s, a.graph_capture_s, a.run_slack_s, a.compare_s = 20.0, 5.0, 2.0, 3.0, 20.0
    # every rank inherits these: multicast off (checked by start_rank), one string hash in every process
    os.environ.update(NO_MULTICAST_ENV)
    os.environ["PYTHONHASHSEED"] = "0"
    world = a.gpus or (2 if a.cpu_smoke or not torch.cuda.is_available() else torch.cuda.device_count())
    a.start_wall, a.port = time.time(), free_port()
    a.command = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items()) + " PYTHONPATH=. python3 " + \
        " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    import torch.multiprocessing as mp
    shm = ShmSync.create(world)
    try:
        mp.spawn(rank_main, args=(world, a, shm), nprocs=world, join=True)
    finally:
        os.unlink(shm)


if __name__ == "__main__":
    main()
