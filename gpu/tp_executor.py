"""Tensor-parallel executor: Llama-3.1-70B on 4 GPUs (Qwen2.5-32B on 2: `ServeArgs.model`) serves a trace
slice one turn at a time, and the profile it is validated against is measured at the same TP degree in
the same call (issue 16, item 5).

One process per GPU, started as run 13's measurement was (`bench/gpu_tp_serve.py`, like
`bench/gpu_tp_run.py`): NCCL's default group over the whole world (made lazily: no `device_id`), one
gloo group over all ranks on loopback for host-side agreement, and no other group: the world is the TP
group. Each rank holds its shard of every layer (`gpu.model.shard_shape`: at TP 4, 16 query heads, 2 KV
heads and 7168 MLP columns of each of the 80 layers, 34 GB in bf16) and a replicated embedding and LM
head (4.2 GB; vLLM splits the LM head by vocabulary, this executor does not: each rank computes every
logit, so no collective follows the last layer). A layer's two partial sums are completed by NCCL
all-reduces inside its CUDA graphs (`gpu.model.Decoder.reduce`).

Per rank, the single-GPU executor (`gpu.executor.Executor`) runs unchanged over the shard: recompute or
DRAM tiers, layer-wise preload of the history from the rank's own pinned arena over its own host link
(the rank's KV heads only), asynchronous saves; `serve_trace` with `agree` makes rank 0's clock and reply
ends everyone's, so every rank serves the same turn at the same time. Rank 0's per-turn rows
(`TurnTiming`) are the measurement.

The profile (`kvsim-hardware-profile/1`, `tp` = world): per-layer prefill and decode tables of the shard
with its all-reduces (`gpu.bench` grids, the ranks aligned before each sample, the slowest rank's
median; a prefill sample replays a stack of layer graphs as many times as the model has layers, a
decode sample is 16 whole steps of the served model back to back, as the executor decodes a reply), LM heads, pinned links measured with every GPU copying at once (the slowest GPU's rate), the
serving loop's host terms from the executor's own turns (`gpu.bench.serving_overheads`, rank 0's; the host
time after a reply whose session goes on, from queued turns served back to back with the ranks agreeing
as in a trace run: `gpu.bench.served_gaps`), and a short SSD pass on rank 0 (the schema needs it; no run
here reads the SSD). Grids cover only the shapes the trace slice needs. The `allreduce` stage times
NCCL all-reduces over message sizes on the world group (`gpu.tp_bench.measure_allreduce`, run 13's
method: `allreduce.csv`, `allreduce_h100.yaml`). Never imports the simulator's engine (simpy is not on
the GPU image).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from gpu import bench
from gpu import model as M
from gpu.calibrate import PREFILL_HIST, write_profile
from gpu.decode_graph import DECODE_BUCKET
from gpu.executor import TraceBounds, PADDING_SLACK_TOKENS, executor_for_trace, serve_trace
from gpu.plans import PLANS, run_name
from gpu.prefill_graph import PADDING
from gpu.tp_bench import (MIB, NO_MULTICAST_ENV, HostGroup, allreduce_sizes, allreduce_table, combine_allreduce,
                          measure_allreduce, run_stage, start_rank, write_csv, write_table_yaml)
from sim.files import atomic_write_json
from sim.models import MODELS
from sim.trace import read_trace, write_trace
from sim.units import GB, MS

# the shapes a TP call may serve (sim.models.MODELS names): run 17's at TP 4; at TP 2 Llama-3.1-70B does
# not fit two 80 GB GPUs (70.5 GB of layers a GPU), Qwen2.5-32B (16 GB of layers a GPU) stands in
SERVED_MODELS = ("llama3.1-70b", "qwen2.5-32b")
DECODE_CTX = (256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class ServeArgs:
    out: str
    budget_s: float
    start_wall: float              # time.time() at launch: the budget counts from it
    trace: str                     # the slice as served (sessions and output cap applied), written by the launcher
    runs: tuple[str, ...]          # run names of gpu/plans.py
    stages: tuple[str, ...]
    smoke: bool
    port: int
    init_timeout_s: float
    command: str
    model: str = "llama3.1-70b"    # the simulator's name of the shape served (one of SERVED_MODELS)


# ------------------------------------------------------------------------ pure helpers
def slice_trace(trace: pd.DataFrame, sessions: int, output_cap: int) -> pd.DataFrame:
    """The first `sessions` sessions (by first arrival), every reply capped at `output_cap` tokens: the
    trace the executor serves and the simulator is given, as one file."""
    first = trace[trace.turn == trace.groupby("session_id").turn.transform("min")].sort_values("arrival_s")
    keep = list(first.session_id[:sessions])
    t = trace[trace.session_id.isin(keep)].copy()
    t["output_tokens"] = t.output_tokens.clip(upper=output_cap)
    return t.reset_index(drop=True)


def calibration_grid(bounds: TraceBounds, runs) -> dict:
    """The table points a slice needs: new-token buckets up to the longest prefill (a recompute turn
    prefills its whole context), history columns up to one past the longest context, decode of one
    sequence (the executor serves one turn at a time) over contexts up to one past the longest."""
    longest = bounds.max_ctx if any(PLANS[r].tier == "recompute" for r in runs) else bounds.max_new
    top = PADDING.new_bucket(min(longest, PADDING.new_tokens[-1]))
    cap = bounds.max_ctx + PADDING.context_multiple

    def upto(values):
        vals = [v for v in values if v < cap]
        more = [v for v in values if v >= cap]
        return vals + more[:1]
    return {"prefill_new": [n for n in PADDING.new_tokens if n <= top], "prefill_hist": upto(PREFILL_HIST),
            "decode_batch": [1], "decode_ctx": upto(DECODE_CTX)}


def slowest_rank(parts: list[dict], table: str, key: tuple[str, ...]) -> dict:
    """Rank results of one grid -> one: per point, the slowest rank's median (a TP layer ends with it)."""
    out = dict(parts[0][table])
    rows = {}
    for p in parts:
        for r in p[table]["rows"]:
            k = tuple(r[x] for x in key)
            if k not in rows or r["ms"] > rows[k]["ms"]:
                rows[k] = r
    out["rows"] = [rows[tuple(r[x] for x in key)] for r in parts[0][table]["rows"]]
    if "head" in out:
        out["head"] = [max((p[table]["head"][i] for p in parts), key=lambda h: h["ms"])
                       for i in range(len(out["head"]))]
    return out


def slowest_links(parts: list[dict]) -> dict:
    """Per link and chunk size, the slowest GPU's rate (every GPU copied at once)."""
    out = {}
    for name in parts[0]:
        out[name] = [min((p[name][i] for p in parts), key=lambda r: r["gbps"]) for i in range(len(parts[0][name]))]
    return out


# ------------------------------------------------------------------------ one rank
class Rank(HostGroup):
    def __init__(self, rank: int, world: int, args: ServeArgs, cuda: bool, host):
        super().__init__(rank, world, host, args.start_wall, args.budget_s)
        self.args, self.cuda = args, cuda
        self.device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if cuda else torch.float32
        # gpu.tp_bench's all-reduce timing asks for the TP group by degree: here the world is the TP group
        self.groups = {world: dist.group.WORLD}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def align(self) -> None:
        """Ranks leave together: a one-element all-reduce on the TP group, then a device sync."""
        dist.all_reduce(torch.ones(1, device=self.device))
        if self.cuda:
            torch.cuda.synchronize()

    def reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)


def concurrent_links(r: Rank, chunks, reps: int = 10) -> dict:
    """Pinned H2D and D2H on every GPU at once (a gloo barrier starts each size): each GPU's rate."""
    top = max(chunks)
    host = torch.empty(top, dtype=torch.uint8, pin_memory=r.cuda)
    host.copy_(torch.randint(0, 256, (top,), dtype=torch.uint8))
    dev = torch.empty(top, dtype=torch.uint8, device=r.device)
    out = {}
    for name in ("h2d_pinned", "d2h_pinned"):
        rows = []
        for c in chunks:
            d, h = dev[:c], host[:c]

            def copy(_, d=d, h=h, name=name):
                for _ in range(reps):
                    (d.copy_(h, non_blocking=True) if name == "h2d_pinned" else h.copy_(d, non_blocking=True))
            dist.barrier(group=r.host)
            ms = bench.time_cuda_ms(copy, warmup=1, reps=3)
            rows.append({"chunk_bytes": c, "ms": ms, "gbps": c * reps / (statistics.median(ms) * MS) / GB})
        out[name] = rows
    return out


def calibrate(r: Rank, shard, model: M.Decoder, grid: dict, out: Path) -> None:
    """Measure the TP profile (module docstring) and write it as `profile_tp<world>.yaml`."""
    dev = "cuda" if r.cuda else "cpu"       # the rank's own GPU is the current device
    r.log(f"calibrate: grid {grid}")
    # A sample runs as many layers back to back as the executor's prefill or decode step does (the
    # ranks aligned once per sample): what a sample pays once is then spread as in serving
    # (gpu.bench.prefill_layer_grid, decode_step_grid; run 14's 8-layer samples were 5% pessimistic).
    passes = max(1, shard.layers // bench.STACK)
    mine = {"prefill": bench.prefill_layer_grid(shard, grid["prefill_new"], grid["prefill_hist"], device=dev,
                                                reduce=r.reduce, align=r.align, passes=passes,
                                                reps=(1, 2) if r.args.smoke else (1, 4),
                                                # idle after each sample as long as it: a served prefill
                                                # follows a reply's decode (run 27's throttled grid)
                                                idle_ratio=1.0)}
    r.log("  prefill grid done")
    mine["decode"] = bench.decode_step_grid(model, grid["decode_batch"], grid["decode_ctx"],
                                            steps=4 if r.args.smoke else 16, reps=(1, 2) if r.args.smoke else (2, 5),
                                            align=r.align)
    mine["head"] = bench.head_times(shard, grid["prefill_new"], grid["decode_batch"], device=dev)
    r.log("  decode grid and heads done")
    mine["serving"] = bench.serving_overheads(shard, reps=2 if r.args.smoke else 5, device=dev, model=model,
                                              new_tokens=(16, 32) if r.args.smoke else (64, 384, 1536),
                                              hist_tokens=16 if r.args.smoke else 256)
    # turns served back to back with the ranks agreeing on each reply's end, as in a trace run: the host
    # time after a reply whose session goes on (rank 0's clock, as the trace runs are measured)
    gaps = bench.served_gaps(model, agree=r.agree, sessions=2 if r.args.smoke else 4,
                             output_tokens=2 if r.args.smoke else 4)
    mine["served_gaps"] = gaps
    # replies decoded right after prefills of several lengths (the decode tables time decode after decode)
    mine["decode_probes"] = bench.decode_probes(model, agree=r.agree, prompts=(16, 32) if r.args.smoke else (64, 1024, 4096),
                                                output_tokens=4 if r.args.smoke else 32, reps=1 if r.args.smoke else 3)
    r.log("  serving host terms done")
    chunks = [1 << k for k in (range(12, 16) if r.args.smoke else range(12, 28))]
    links = concurrent_links(r, chunks, reps=2 if r.args.smoke else 10)
    parts = r.gather({"layers": mine, "links": links})
    if r.rank == 0:
        ssd_dir = Path("/tmp/kvsim_tp_ssd")
        raw = {"device": torch.cuda.get_device_name(0) if r.cuda else "cpu (smoke: tiny shape, not a profile)",
               "measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": r.args.command, "torch": torch.__version__, "stack_layers": bench.STACK, "tp": r.world,
               "prefill_padding": {"new_tokens": list(PADDING.new_tokens), "context_multiple": PADDING.context_multiple},
               # the executor's decode graphs attend over whole buckets of keys: a step costs its bucket's
               "decode_padding": {"context_multiple": DECODE_BUCKET},
               "gpu": _peaks(r), "links": slowest_links([p["links"] for p in parts]),
               # 64 MiB a size: the schema's table, not a figure any run here uses
               "ssd": bench.ssd_bandwidth(ssd_dir, [1 << 18, 1 << 20] if r.args.smoke else [1 << 18, 1 << 22, 1 << 26],
                                          min_bytes=(1 << 20) if r.args.smoke else (1 << 26))}
        layers = [p["layers"] for p in parts]
        raw["models"] = {r.args.model: {
            "prefill": slowest_rank(layers, "prefill", ("new_tokens", "history_tokens")),
            "decode": slowest_rank(layers, "decode", ("batch", "context_tokens")),
            "head": layers[0]["head"], "serving": layers[0]["serving"], "served_gaps": layers[0]["served_gaps"],
            "decode_probes": layers[0]["decode_probes"]}}
        write_profile(raw, out / f"profile_tp{r.world}.yaml", out / "calibration_raw.json")
        r.log(f"  profile_tp{r.world}.yaml written")


def _peaks(r: Rank) -> dict:
    if r.cuda:
        return bench.gpu_peaks()
    # smoke: the host's own rates stand in (the schema needs numbers > 0); HBM as an H100's
    a = torch.randn(256, 256)
    ms = statistics.median(bench.time_cuda_ms(lambda _: a @ a, reps=5))
    return {"peak_bf16_flops": 2 * 256 ** 3 / (ms * MS), "hbm_bw_gbps": 10.0, "hbm_bytes": 80_000_000_000}


def run_rank(rank: int, world: int, args: ServeArgs) -> None:
    trace_line, cuda = start_rank(rank, args.port, args.start_wall, args.smoke)
    timeout = dt.timedelta(seconds=args.init_timeout_s)
    trace_line("init")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    trace_line("default group up")
    # the host group waits while rank 0 writes files or times the SSD: a longer timeout than start-up's
    host = dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=max(args.init_timeout_s, 300)))
    r = Rank(rank, world, args, cuda, host)
    r.align()                      # the NCCL communicator is made here, by its first collective
    trace_line("groups up, first all-reduce done")
    out = Path(args.out)
    trace = read_trace(args.trace)
    full = MODELS[args.model] if cuda else M.TINY_GQA
    shard = M.shard_shape(full, world)
    bounds = TraceBounds.of(trace)
    grid = calibration_grid(bounds, args.runs)
    if args.smoke:      # the script's path, not its numbers: two points a side keep the CPU run short
        grid = {"prefill_new": grid["prefill_new"][:2], "prefill_hist": grid["prefill_hist"][:2],
                "decode_batch": [1], "decode_ctx": grid["decode_ctx"][:2]}
    # RoPE rows for the served turns, the prefill grid's largest shape and the decode grid's contexts
    # (decode_step_grid times the served model itself)
    max_pos = max(bounds.max_ctx + PADDING_SLACK_TOKENS, max(grid["prefill_new"]) + max(grid["prefill_hist"]),
                  max(grid["decode_ctx"]))
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.time()
    model = M.random_decoder(shard, max_pos, r.device, dtype, seed=2, reduce=r.reduce, rank=rank)
    if cuda:
        torch.cuda.synchronize()
    r.log(f"{full.name} TP {world}: shard {shard.heads} heads / {shard.kv_heads} KV heads / {shard.intermediate} "
          f"MLP columns x {shard.layers} layers, built in {time.time() - t0:.1f} s; "
          + (f"{torch.cuda.memory_allocated() / GB:.1f} GB on GPU 0" if cuda else "cpu"))
    env = {"world": world, "torch": torch.__version__, "cuda": cuda, "command": args.command,
           "env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV}, "shape": dataclasses.asdict(full),
           "grid": grid, "sessions": int(trace.session_id.nunique()), "turns": len(trace)}
    if cuda:
        env.update(device=torch.cuda.get_device_name(0), nccl=".".join(map(str, torch.cuda.nccl.version())))
    if rank == 0:
        atomic_write_json(out / "env.json", env)

    def stage(name, need_s, fn, key=None):
        run_stage(r, rank, args.stages, name, need_s, fn, key)

    def allreduce():
        # run 13's sizes (8 KiB-256 MiB and the layer's own messages at this hidden size); graphs up to 4 MiB
        sizes = allreduce_sizes(hidden=full.hidden) if cuda else [1024, 4096]
        rows = r.gather(measure_allreduce(r, world, sizes, graph_max_bytes=4 * MIB, samples=11 if cuda else 2,
                                          use_graph=cuda))
        if rank == 0:
            comb = combine_allreduce([x for part in rows for x in part])
            write_csv(comb, out / "allreduce.csv")
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            write_table_yaml(allreduce_table(comb, env.get("device", "cpu"), stamp, args.command),
                             out / "allreduce_h100.yaml")
            r.log(f"  all-reduce TP {world}: " + ", ".join(f"{x['bytes'] >> 10} KiB {x['us']:.1f} us"
                                                         for x in comb if x["mode"] == ("graph" if cuda else "eager")
                                                         and x["bytes"] in (16 * 1024, 1 << 20, 16 << 20)))

    stage("allreduce", 10 if cuda else 0, allreduce)
    stage("calibrate", 60 if cuda else 0, lambda: calibrate(r, shard, model, grid, out))
    frames = []
    for run in args.runs:
        def serve(run=run):
            plan = PLANS[run]
            ex = executor_for_trace(model, plan, trace)
            try:
                df = serve_trace(ex, trace, agree=r.agree)
            finally:
                ex.close()
            del ex
            if cuda:
                torch.cuda.empty_cache()      # the run's graphs and caches, before the next run's
            if rank == 0:
                df["run"] = run_name(plan)
                frames.append(df)
                write_csv(pd.concat(frames, ignore_index=True).to_dict("records"), out / "trace_runs.csv")
                r.log(f"trace {run}: {len(df)} turns, mean TTFT {df.ttft_s.mean() / MS:.1f} ms, "
                      f"p50 {df.ttft_s.median() / MS:.1f} ms")
        # a run takes about the slice's arrival span plus its service time: the last arrival plus slack
        stage(f"trace {run}", (float(trace.arrival_s.max()) + 30) if cuda else 0, serve, key="trace")
    r.log("done")
    dist.barrier(group=host)
    dist.destroy_process_group()


def write_slice(trace_path, sessions: int, output_cap: int, out) -> Path:
    """The launcher's slice of the trace, written where the ranks and the validation read it."""
    t = slice_trace(read_trace(trace_path), sessions, output_cap)
    path = Path(out) / "trace_tp.parquet"
    write_trace(t, path)
    return path

