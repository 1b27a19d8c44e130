"""What tensor parallelism costs on one multi-GPU host: NCCL all-reduce, a TP-sharded layer, GEMM
efficiency, and host links with several GPUs copying at once.

One process per GPU (`torch.distributed`, NCCL; gloo on CPU for the smoke run). Method as in
`gpu.bench` (/work/.library/device/METHOD.md): warm up, time with CUDA events, medians over repeats,
fresh random inputs before each timed sample (never zeros).

- All-reduce: bf16, in place, message sizes 8 KiB..256 MiB (`allreduce_sizes`). A sample times `k`
  back-to-back all-reduces between two events and divides, after an all-reduce of one element aligned
  the ranks, so rank skew is paid once per `k`; small sizes are also timed as a CUDA graph of the same
  `k` all-reduces (the executor replays layers as graphs, where launches cost less). A collective ends
  when its slowest rank does: the figure is the slowest rank's median. Bus bandwidth as nccl-tests
  reports it (its PERFORMANCE.md): algbw = bytes / time, busbw = algbw * 2 (n - 1) / n.
- Layer: `gpu.tp_layer` at Llama-3.1-70B's shape, a stack of `STACK` layers captured as one CUDA graph
  (as `gpu.bench` times single-GPU layers), with and without its two all-reduces, at each TP degree and
  on one GPU unsharded (the scaling baseline).
- GEMMs: x @ W.T for the weight matrices of a layer (per TP shard), weights rotated among copies so
  that the set exceeds L2 (50 MB on an H100).
- Host links: pinned H2D / D2H / both at once on 1, 2 and 4 GPUs started together by a barrier.

Every `measure_*` returns rank-local rows (plain dicts); `combine_*` and `allreduce_table` reduce the
rows of all ranks; `run_rank` is one rank's whole run, writing each stage's file as the stage ends.
"""
from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import statistics
import subprocess
import time
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gpu import model as M
from gpu import tp_layer as T
from sim.files import atomic_write, atomic_write_json, atomic_write_text
from sim.models import MODELS, ModelShape
from sim.units import GB, MS, TB, TFLOPS, US

KIB, MIB = 1 << 10, 1 << 20
STACK = 8                     # layers per timed graph replay, as gpu.bench
# Datasheet peaks of an H100 SXM (dense bf16, HBM3) and the roofline's default efficiencies
# (configs' gpu.prefill_mfu / gpu.decode_mbu), against which the GEMM sweep is read.
H100_PEAK_FLOPS = 989 * TFLOPS
H100_HBM_BYTES_S = 3.35 * TB
ROOFLINE_MFU, ROOFLINE_MBU = 0.55, 0.75
# NVLink multicast can take a shared host's GPUs out of service: every process runs with it off.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ------------------------------------------------------------------------ pure helpers
def allreduce_sizes(lo: int = 8 * KIB, hi: int = 256 * MIB, hidden: int = 8192, dtype_bytes: int = 2,
                    decode_batches=(1, 8, 32, 64, 128, 256), prefill_tokens=(512, 1024, 2048, 4096, 8192)) -> list[int]:
    """Powers of two and their 1.5x midpoints from `lo` to `hi` (a factor of ~1.4 between sizes), with the
    messages a TP layer really sends: a decode step's [batch, hidden] and a prefill chunk's [tokens, hidden]."""
    sizes = set()
    b = lo
    while b <= hi:
        sizes.add(b)
        if b * 3 // 2 <= hi:
            sizes.add(b * 3 // 2)
        b *= 2
    sizes.update(n * hidden * dtype_bytes for n in (*decode_batches, *prefill_tokens)
                 if lo <= n * hidden * dtype_bytes <= hi)
    return sorted(sizes)


def bus_bandwidth_gbps(nbytes: float, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s of one all-reduce, as nccl-tests computes them."""
    alg = nbytes / seconds / GB
    return alg, alg * 2 * (ranks - 1) / ranks


def combine_allreduce(rows: list[dict]) -> list[dict]:
    """Rank rows -> one row per (tp, bytes, mode): the slowest rank's median (a collective ends with it)."""
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["tp"], r["bytes"], r["mode"]), []).append(r)
    out = []
    for (tp, nbytes, mode), rs in sorted(keyed.items()):
        us = max(r["us_median"] for r in rs)
        alg, bus = bus_bandwidth_gbps(nbytes, us * US, tp)
        out.append({"tp": tp, "bytes": nbytes, "mode": mode, "us": us,
                    "us_fastest_rank": min(r["us_median"] for r in rs),
                    "us_p10": max(r["us_p10"] for r in rs), "us_p90": max(r["us_p90"] for r in rs),
                    "ops_per_sample": rs[0]["ops"], "samples": rs[0]["samples"],
                    "algbw_gbps": alg, "busbw_gbps": bus})
    return out


def allreduce_table(combined: list[dict], device: str, measured_at: str, command: str) -> dict:
    """The `kvsim-allreduce-table/1` document: per TP degree, ascending sizes and the time of one all-reduce.

    Where a size was also timed as a CUDA graph, the graph's time is the one written: served layers run
    as graph replays (`gpu.prefill_graph`, `gpu.decode_graph`); the eager figure stays in the CSV.
    """
    tp: dict[int, dict] = {}
    for deg in sorted({r["tp"] for r in combined}):
        by_size: dict[int, dict] = {}
        for r in combined:
            if r["tp"] == deg:
                by_size.setdefault(r["bytes"], {})[r["mode"]] = r["us"]
        sizes = sorted(by_size)
        tp[deg] = {"bytes": sizes,
                   "us": [round(by_size[b].get("graph", by_size[b].get("eager")), 3) for b in sizes]}
    return {"schema": "kvsim-allreduce-table/1", "device": device, "measured_at": measured_at,
            "command": command, "tp": tp}


def layer_matrices(shape: ModelShape, tp: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of the weight matrices one TP rank multiplies by in a layer (fused as the layer runs)."""
    T.check_tp(shape, tp)
    D, H = shape.head_dim, shape.hidden
    return [("qkv", (shape.heads + 2 * shape.kv_heads) * D // tp, H),
            ("o", H, shape.heads * D // tp),
            ("gate_up", 2 * shape.intermediate // tp, H),
            ("down", H, shape.intermediate // tp)]


def gemm_row(tokens: int, n_out: int, k_in: int, ms: float, dtype_bytes: int = 2,
             peak_flops: float = H100_PEAK_FLOPS, hbm_bytes_s: float = H100_HBM_BYTES_S,
             mfu: float = ROOFLINE_MFU, mbu: float = ROOFLINE_MBU) -> dict:
    """[tokens, k] @ [k, n]: FLOPs, the fewest bytes (each operand read once, the output written once),
    achieved rates as fractions of the peaks, and the roofline's time max(F / (peak mfu), B / (bw mbu))."""
    flops = 2.0 * tokens * n_out * k_in
    nbytes = float(dtype_bytes * (tokens * k_in + n_out * k_in + tokens * n_out))
    s = ms * MS
    roof = max(flops / (peak_flops * mfu), nbytes / (hbm_bytes_s * mbu))
    return {"tokens": tokens, "n": n_out, "k": k_in, "ms": ms, "flops": flops, "bytes": nbytes,
            "tflops": flops / s / TFLOPS, "gbps": nbytes / s / GB,
            "frac_peak_flops": flops / s / peak_flops, "frac_peak_bw": nbytes / s / hbm_bytes_s,
            "bound": "compute" if flops / peak_flops > nbytes / hbm_bytes_s else "memory",
            "roofline_ms": roof / MS, "measured_over_roofline": s / roof}


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]     # noqa: E731
    return float(statistics.median(xs)), pick(0.1), pick(0.9)


# ------------------------------------------------------------------------ one rank's context
@dataclass(frozen=True)
class RunArgs:
    out: str
    budget_s: float
    start_wall: float                 # time.time() when the launcher started: the budget counts from it
    stages: tuple[str, ...]
    tps: tuple[int, ...]
    smoke: bool
    port: int
    command: str


def free_port() -> int:
    """A free TCP port on the loopback, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(r, rank: int, stages, name: str, need_s: float, fn, key: str | None = None) -> None:
    """Run one stage of a multi-process call on every rank alike: skipped unless asked for (`key`, default
    `name`, in `stages`) and rank 0 sees `need_s` seconds left of the budget; a failure prints the rank's
    traceback before it propagates (the other ranks then time out in their next collective)."""
    if (key or name) not in stages:
        return
    if not r.agree(r.left_s() > need_s):
        r.log(f"{name}: skipped, {r.left_s():.0f} s left, needs ~{need_s:.0f}")
        return
    t0 = time.time()
    try:
        fn()
    except Exception:
        print(f"[rank {rank}] {name} FAILED\n{traceback.format_exc()}", flush=True)
        raise
    r.log(f"{name}: done in {time.time() - t0:.1f} s")


class HostGroup:
    """A rank's host-side view of a multi-GPU call: its rank and world, the gloo group `host` over every
    rank, the call's start on the wall clock and its budget; rank 0 logs, decides (`agree`) and collects
    (`gather`)."""

    def __init__(self, rank: int, world: int, host, start_wall: float, budget_s: float):
        self.rank, self.world, self.host, self.start_wall, self.budget_s = rank, world, host, start_wall, budget_s

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{time.time() - self.start_wall:6.1f}s] {msg}", flush=True)

    def left_s(self) -> float:
        return self.budget_s - (time.time() - self.start_wall)

    def agree(self, obj):
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, on rank 0 (rank order); [] elsewhere."""
        got = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, got, dst=0, group=self.host)
        return got if self.rank == 0 else []


@dataclass
class Rank(HostGroup):
    rank: int
    world: int
    args: RunArgs
    cuda: bool
    device: torch.device
    dtype: torch.dtype
    host: object                      # gloo group over every rank: objects and host barriers
    groups: dict                      # tp (> 1) -> process group of ranks [0, tp)

    @property
    def start_wall(self) -> float:
        return self.args.start_wall

    @property
    def budget_s(self) -> float:
        return self.args.budget_s

    def gather(self, rows: list) -> list:
        """Every rank's rows, concatenated on rank 0 (empty elsewhere)."""
        return [r for part in HostGroup.gather(self, rows) for r in part]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _align(r: Rank, group) -> None:
    """Ranks of `group` leave together: a one-element all-reduce completes on all GPUs at once
    (no group: a single GPU's timing, which only waits for its own work)."""
    if group is not None:
        dist.all_reduce(torch.ones(1, device=r.device, dtype=torch.float32), group=group)
    r.sync()


def _time_samples(r: Rank, body, setup, group, samples: int, warmup: int = 2) -> list[float]:
    """ms of `body()` per sample; `setup()` (fresh inputs) and the alignment run outside the timed span."""
    out = []
    for i in range(warmup + samples):
        setup()
        _align(r, group)
        if r.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            body()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            body()
            ms = (time.perf_counter() - t0) / MS
        if i >= warmup:
            out.append(ms)
    return out


def _group_agrees(r: Rank, tp: int, ok: bool) -> bool:
    """Rank 0's decision for the ranks of a TP group (all of them must run the same collectives)."""
    if tp == 1:
        return ok
    flag = torch.tensor([int(ok)], device=r.device, dtype=torch.int32)
    dist.broadcast(flag, src=0, group=r.groups[tp])
    return bool(flag.item())


def _capture(r: Rank, fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):          # warm-up off the capture, as torch.cuda.graphs advises
        fn()
    torch.cuda.current_stream().wait_stream(s)
    r.sync()
    g = torch.cuda.CUDAGraph()
    # thread-local: the NCCL watchdog thread's event queries must not invalidate this capture
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        fn()
    r.sync()
    return g


# ------------------------------------------------------------------------ stages
def check_tp_layer(r: Rank, tp: int) -> dict:
    """Rank `rank` of `tp` runs its shard with real all-reduces; the output must equal the unsharded
    layer's on the same inputs (decode, prefill from 0, prefill after history: each attention path)."""
    shape, group = T.TINY_GQA, r.groups[tp]
    dev, dt_ = r.device, r.dtype
    full = T.random_full_layer(shape, dev, dt_, seed=11)
    one = T.shard(full, shape, 0, 1)
    cos, sin = M.rope_tables(shape, 64, dev, dt_)
    err = 0.0
    for start, n in ((9, 1), (0, 5), (7, 3)):
        g = torch.Generator(device=dev).manual_seed(100 + start + n)
        cache = torch.randn((2, 32, 2, shape.kv_heads, shape.head_dim), generator=g, device=dev, dtype=dt_)
        x = torch.randn((2, n, shape.hidden), generator=g, device=dev, dtype=dt_)
        ref = T.tp_layer_forward(one, x, cache.clone(), start, cos[start:start + n], sin[start:start + n],
                                 lambda t: t).float()
        if r.rank < tp:
            def reduce(t, group=group):
                dist.all_reduce(t, group=group)
                return t
            got = T.tp_layer_forward(T.shard(full, shape, r.rank, tp), x, T.shard_kv(cache, r.rank, tp), start,
                                     cos[start:start + n], sin[start:start + n], reduce).float()
            err = max(err, float((got - ref).norm() / ref.norm()))
    return {"tp": tp, "rank": r.rank, "rel_err": err if r.rank < tp else None}


def measure_allreduce(r: Rank, tp: int, sizes: list[int], graph_max_bytes: int, samples: int,
                      use_graph: bool) -> list[dict]:
    if r.rank >= tp:
        return []
    group, rows = r.groups[tp], []
    esize = torch.tensor([], dtype=r.dtype).element_size()
    for nbytes in sizes:
        buf = torch.empty(nbytes // esize, device=r.device, dtype=r.dtype)
        k = 20 if nbytes <= MIB else (10 if nbytes <= 16 * MIB else 3)

        def ops(buf=buf, k=k):
            for _ in range(k):
                dist.all_reduce(buf, group=group)
        modes = [("eager", ops)]
        if use_graph and nbytes <= graph_max_bytes:
            modes.append(("graph", _capture(r, ops).replay))
        for mode, body in modes:
            ms = _time_samples(r, body, buf.normal_, group, samples)
            med, p10, p90 = quantiles([m / k * MS / US for m in ms])     # one all-reduce, in us
            rows.append({"tp": tp, "bytes": nbytes, "mode": mode, "rank": r.rank, "ops": k, "samples": samples,
                         "us_median": med, "us_p10": p10, "us_p90": p90})
        del buf
    return rows


def layer_points(smoke: bool) -> list[tuple[str, int, int, int]]:
    """(phase, batch, new tokens, history per sequence): a coarse grid over prefill and decode."""
    if smoke:
        return [("prefill", 1, 4, 8), ("decode", 2, 1, 16)]
    prefill = [("prefill", 1, n, h) for h in (0, 2048, 8192) for n in (1, 4, 16, 64, 256, 512, 1024, 2048, 4096)]
    decode = [("decode", b, 1, c) for b in (1, 8, 32, 64, 128, 256) for c in (256, 1024, 4096, 8192)]
    # alternated, so that a deadline that cuts the grid short still leaves both phases covered
    return [p for pair in itertools.zip_longest(prefill, decode) for p in pair if p]


def measure_layer(r: Rank, tp: int, shape: ModelShape, points, use_graph: bool, deadline_s: float) -> list[dict]:
    """ms per layer of this rank's shard at each point, with and without the two all-reduces.

    Ranks outside the group return at once; inside it, every rank walks the same points (the graphs hold
    collectives), and skips the rest together once rank 0 of the group says the deadline is near.
    """
    if r.rank >= tp:
        return []
    group, rows = r.groups.get(tp), []          # one GPU: no group, nothing to align
    full = T.random_full_layer(shape, r.device, r.dtype, seed=3)
    w = T.shard(full, shape, r.rank, tp)
    del full
    max_pos = max(h + n for _, _, n, h in points) + 1
    cos, sin = M.rope_tables(shape, max_pos, r.device, r.dtype)

    def reduce(t):
        dist.all_reduce(t, group=group)
        return t
    for phase, batch, n, hist in points:
        if not _group_agrees(r, tp, time.time() - r.args.start_wall < deadline_s):
            break
        cache = torch.randn((batch, hist + n, 2, w.kv_heads, w.head_dim), device=r.device, dtype=r.dtype)
        x = torch.randn((batch, n, shape.hidden), device=r.device, dtype=r.dtype)
        c, s = cos[hist:hist + n], sin[hist:hist + n]
        # the same on every rank: the graphs hold collectives
        replays, samples = (1, 1) if r.args.smoke else (1, 5) if batch * n >= 1024 else (4, 9)
        depth = 2 if r.args.smoke else STACK
        for comm in ((True, False) if tp > 1 else (False,)):
            red = reduce if comm else (lambda t: t)

            def stack(red=red):
                y = x
                for _ in range(depth):
                    y = T.tp_layer_forward(w, y, cache, hist, c, s, red)
                return y
            mode = "eager"
            body = stack
            if use_graph:
                body, mode = _capture(r, stack).replay, "graph"

            def run(body=body):
                for _ in range(replays):
                    body()
            ms = _time_samples(r, run, x.normal_, group, samples, warmup=1)
            med, p10, p90 = quantiles([m / replays / depth for m in ms])
            rows.append({"tp": tp, "rank": r.rank, "phase": phase, "batch": batch, "new_tokens": n,
                         "history": hist, "comm": comm, "mode": mode, "ms_median": med, "ms_p10": p10,
                         "ms_p90": p90, "samples": samples})
            del body
        cache = x = None          # freed before the next point allocates its own
        if r.cuda:
            torch.cuda.empty_cache()
    return rows


def combine_layer(rows: list[dict]) -> list[dict]:
    """One row per (tp, point, comm): the slowest rank's median, and the fastest's for the spread."""
    keyed: dict[tuple, list[dict]] = {}
    for x in rows:
        keyed.setdefault((x["tp"], x["phase"], x["batch"], x["new_tokens"], x["history"], x["comm"]), []).append(x)
    out = []
    for (tp, phase, b, n, h, comm), rs in sorted(keyed.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        out.append({"tp": tp, "phase": phase, "batch": b, "new_tokens": n, "history": h, "comm": comm,
                    "mode": rs[0]["mode"], "ms": max(x["ms_median"] for x in rs),
                    "ms_fastest_rank": min(x["ms_median"] for x in rs),
                    "ms_p90": max(x["ms_p90"] for x in rs), "ranks": len(rs)})
    return out


def gemm_shapes(smoke: bool) -> list[tuple[str, int, str, int, int]]:
    """(model, tp, matrix, out, in) for the 7B and 13B layers and the 70B layer per TP shard."""
    if smoke:
        return [("tiny-gqa", tp, *m) for tp in (1, 2) for m in layer_matrices(T.TINY_GQA, tp)]
    return ([(name, 1, *m) for name in ("llama2-7b", "llama2-13b") for m in layer_matrices(MODELS[name], 1)]
            + [(T.LLAMA31_70B.name, tp, *m) for tp in (1, 2, 4) for m in layer_matrices(T.LLAMA31_70B, tp)])


GEMM_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def measure_gemms(r: Rank, shapes, tokens, samples: int = 7) -> list[dict]:
    """x [t, k] @ W.T for each matrix and token count, on this rank's GPU; weights and inputs rotate among
    copies whose total exceeds L2, so each product reads its weights from HBM, as a layer does."""
    rows = []
    esize = torch.tensor([], dtype=r.dtype).element_size()
    for model, tp, name, n_out, k_in in shapes:
        copies = max(1, min(8, math.ceil(256 * MIB / (n_out * k_in * esize))))
        ws = [torch.randn((n_out, k_in), device=r.device, dtype=r.dtype) for _ in range(copies)]
        for t in tokens:
            xs = [torch.randn((t, k_in), device=r.device, dtype=r.dtype) for _ in range(copies)]
            est = max(2.0 * t * n_out * k_in / (0.8 * H100_PEAK_FLOPS), n_out * k_in * esize / H100_HBM_BYTES_S)
            rounds = max(1, min(50, math.ceil(0.5 * MS / (copies * est))))

            def body(xs=xs):
                for _ in range(rounds):
                    for a, wm in zip(xs, ws):
                        a @ wm.T

            def fresh(xs=xs):
                for a in xs:
                    a.normal_()
            ms = _time_samples(r, body, fresh, None, samples)
            med = statistics.median(ms) / (rounds * copies)
            rows.append({"model": model, "tp": tp, "matrix": name,
                         **gemm_row(t, n_out, k_in, med, dtype_bytes=esize), "rank": r.rank})
    return rows


def measure_peaks(r: Rank) -> dict:
    """Measured ceilings on this GPU: an 8192^3 bf16 product and a 1 GiB device-to-device copy."""
    n = 8192
    a, b = (torch.randn(n, n, device=r.device, dtype=r.dtype) for _ in range(2))
    mm = _time_samples(r, lambda: a @ b, lambda: None, None, 10, warmup=3)
    src = torch.randn(1 << 29, device=r.device, dtype=r.dtype)
    dst = torch.empty_like(src)
    cp = _time_samples(r, lambda: dst.copy_(src), lambda: None, None, 10, warmup=3)
    return {"matmul_tflops": 2 * n ** 3 / (statistics.median(mm) * MS) / TFLOPS,
            "d2d_copy_gbps": 2 * src.numel() * src.element_size() / (statistics.median(cp) * MS) / GB}


def measure_host_links(r: Rank, counts=(1, 2, 4), chunk: int = 256 * MIB, reps: int = 16, trials: int = 3) -> list[dict]:
    """Pinned H2D, D2H and both at once on the first `g` GPUs together; host clock per rank (the copies
    are synchronised before it is read), ranks started by a host barrier. Returns rank rows."""
    host = torch.empty(2 * chunk, dtype=torch.uint8, pin_memory=True)
    noise = torch.randint(0, 256, (16 * MIB,), dtype=torch.uint8)
    host.view(-1, noise.numel()).copy_(noise)           # every page touched, random bytes
    dev = torch.empty(2 * chunk, dtype=torch.uint8, device=r.device)
    dev.copy_(host)
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    rows = []
    for g in counts:
        if g > r.world:
            continue
        for direction in ("h2d", "d2h", "both"):
            for trial in range(trials):
                active = r.rank < g
                r.sync()
                dist.barrier(group=r.host)
                t0 = time.perf_counter()      # CLOCK_MONOTONIC: one clock for every process of the host
                if active:
                    for _ in range(reps):
                        if direction in ("h2d", "both"):
                            with torch.cuda.stream(up):
                                dev[:chunk].copy_(host[:chunk], non_blocking=True)
                        if direction in ("d2h", "both"):
                            with torch.cuda.stream(down):
                                host[chunk:].copy_(dev[chunk:], non_blocking=True)
                    r.sync()
                t1 = time.perf_counter()
                if active:
                    nbytes = reps * chunk * (2 if direction == "both" else 1)
                    rows.append({"gpus": g, "direction": direction, "trial": trial, "rank": r.rank,
                                 "bytes": nbytes, "t0": t0, "t1": t1, "gbps": nbytes / (t1 - t0) / GB})
    del host, dev
    return rows


def combine_host_links(rows: list[dict]) -> list[dict]:
    """Per (gpus, direction): the median over trials of the aggregate rate (all ranks' bytes over the span
    from the first start to the last end) and of the slowest and fastest rank's own rate."""
    keyed: dict[tuple, dict[int, list[dict]]] = {}
    for x in rows:
        keyed.setdefault((x["gpus"], x["direction"]), {}).setdefault(x["trial"], []).append(x)
    out = []
    for (g, d), trials in sorted(keyed.items()):
        agg = [sum(x["bytes"] for x in rs) / (max(x["t1"] for x in rs) - min(x["t0"] for x in rs)) / GB
               for rs in trials.values()]
        out.append({"gpus": g, "direction": d, "aggregate_gbps": statistics.median(agg),
                    "per_gpu_min_gbps": statistics.median(min(x["gbps"] for x in rs) for rs in trials.values()),
                    "per_gpu_max_gbps": statistics.median(max(x["gbps"] for x in rs) for rs in trials.values()),
                    "trials": len(agg)})
    return out


def sdpa_backends(r: Rank, shape: ModelShape, tp: int) -> dict:
    """Which of torch's fused SDPA kernels accept each attention call of the TP shard (one backend at a
    time); the timed layer uses torch's default choice among those that accept."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    hq, hkv, D = shape.heads // tp, shape.kv_heads // tp, shape.head_dim
    out = {}
    for label, n, start in (("decode", 1, 512), ("prefill", 256, 0), ("prefill_after_history", 256, 512)):
        q = torch.randn((1, hq, n, D), device=r.device, dtype=r.dtype)
        kv = torch.randn((1, start + n, 2, hkv, D), device=r.device, dtype=r.dtype)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        kw = ({} if n == 1 else {"is_causal": True} if start == 0
              else {"attn_mask": torch.nn.attention.bias.causal_lower_right(n, start + n)})
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                r.sync()
                out.setdefault(label, []).append(be.name)
            except Exception as exc:          # a refusal is the answer here
                out.setdefault(label + "_refused", []).append(f"{be.name}: {str(exc).splitlines()[0][:160]}")
    return out


# ------------------------------------------------------------------------ files
def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    if not rows:
        return
    keys = list(rows[0])

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def write_table_yaml(doc: dict, path: Path) -> None:
    import yaml
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except Exception as exc:           # informational only
        return repr(exc)


# ------------------------------------------------------------------------ one rank's whole run
def start_rank(rank: int, port: int, start_wall: float, smoke: bool):
    """A rank process's set-up before its process group, for every multi-GPU launch: NVLink multicast
    checked off, rendezvous and gloo on loopback, the device picked (CPU with one thread a rank for a
    smoke run). Returns (trace: prints a line tagged with rank and elapsed time, cuda)."""
    for k, v in NO_MULTICAST_ENV.items():
        if os.environ.get(k) != v:
            raise SystemExit(f"{k} must be {v} in every process (NVLink multicast stays off)")
    # one host: rendezvous and gloo's sockets on loopback (the VM's hostname need not resolve to a reachable address)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")

    def trace(msg):      # every rank, so that a hang shows where
        print(f"[rank {rank} {time.time() - start_wall:6.1f}s] {msg}", flush=True)
    cuda = torch.cuda.is_available() and not smoke
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)      # ranks share the host's cores
    return trace, cuda


def run_rank(rank: int, world: int, args: RunArgs) -> None:
    trace, cuda = start_rank(rank, args.port, args.start_wall, args.smoke)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    trace("init")
    # No device_id: NCCL communicators are then made lazily, by a group's first collective, so a rank
    # outside a TP group takes no part in making that group's communicator.
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=dt.timedelta(minutes=5))
    trace("default group up")
    host = dist.new_group(backend="gloo", timeout=dt.timedelta(minutes=5))
    trace("gloo group up")
    tps = tuple(t for t in args.tps if 1 < t <= world)      # all-reduce degrees
    # every rank creates every group, in the same order (torch.distributed requires it); the whole world
    # is the default group
    groups = {tp: dist.group.WORLD if tp == world else dist.new_group(list(range(tp))) for tp in tps}
    r = Rank(rank, world, args, cuda, device, torch.bfloat16 if cuda else torch.float32, host, groups)
    trace("tp groups up")
    out = Path(args.out)
    env: dict = {"world": world, "torch": torch.__version__, "cuda": cuda, "argv_command": args.command,
                 "env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV}}
    if cuda:
        env.update(device=torch.cuda.get_device_name(0), nccl=".".join(map(str, torch.cuda.nccl.version())),
                   nvidia_smi=_run(["nvidia-smi"]), topology=_run(["nvidia-smi", "topo", "-m"]),
                   lscpu=_run(["lscpu"]), meminfo=Path("/proc/meminfo").read_text()[:300])
    device_name = env.get("device", "cpu")

    def save_env():
        if rank == 0:
            atomic_write_json(out / "env.json", env)
    save_env()
    r.log(f"world {world}, tp {tps}, {device_name}, torch {torch.__version__}")

    def stage(name, need_s, fn):
        run_stage(r, rank, args.stages, name, need_s, fn)

    use_graph = [cuda]

    def check():
        rows = r.gather([check_tp_layer(r, tp) for tp in tps])
        if cuda:      # a CUDA graph that holds an NCCL all-reduce must capture on every rank, or none use one
            ok = True
            try:
                t = torch.ones(1024, device=device, dtype=r.dtype)
                _capture(r, lambda: dist.all_reduce(t)).replay()
                r.sync()
            except Exception as exc:
                ok = False
                print(f"[rank {rank}] graph capture of an all-reduce failed: {exc!r}", flush=True)
            oks = [None] * world
            dist.all_gather_object(oks, ok, group=host)
            use_graph[0] = all(oks)
        if rank == 0:
            tol = 2e-2 if cuda else 1e-5
            errs = [x["rel_err"] for x in rows if x["rel_err"] is not None]
            env["tp_check"] = {"rows": rows, "tolerance": tol, "passed": all(e < tol for e in errs),
                               "graphs_with_allreduce": use_graph[0]}
            if cuda:
                env["sdpa"] = {f"tp{tp}": sdpa_backends(r, T.LLAMA31_70B, tp) for tp in tps}
            save_env()
            r.log(f"tp check: max rel err {max(errs):.2e} (tol {tol}), graphs with all-reduce: {use_graph[0]}")
        if not r.agree(env["tp_check"]["passed"] if rank == 0 else True):
            raise SystemExit("sharded layer differs from the unsharded one")

    ar_rows: list[dict] = []

    def allreduce():
        sizes = allreduce_sizes() if cuda else [1024, 4096, 16384]
        for tp in tps:
            ar_rows.extend(r.gather(measure_allreduce(r, tp, sizes, graph_max_bytes=4 * MIB,
                                                      samples=11 if cuda else 2, use_graph=use_graph[0])))
            if rank == 0:
                comb = combine_allreduce(ar_rows)
                write_csv(comb, out / "allreduce.csv")
                doc = allreduce_table(comb, device_name, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                      args.command)
                write_table_yaml(doc, out / "allreduce_h100.yaml" if cuda else out / "allreduce.yaml")

    def gemm():
        if rank == 0:
            rows = measure_gemms(r, gemm_shapes(args.smoke), GEMM_TOKENS if cuda else (1, 4), samples=7 if cuda else 2)
            if cuda:
                env["peaks"] = measure_peaks(r)
                save_env()
            write_csv(rows, out / "gemm.csv")
        dist.barrier(group=host)

    def links():
        if not cuda:
            return
        rows = r.gather(measure_host_links(r))
        if rank == 0:
            write_csv(combine_host_links(rows), out / "host_links.csv")

    lay_rows: list[dict] = []

    def layer():
        shape = T.LLAMA31_70B if cuda else T.TINY_GQA
        order = (*tps, 1)                 # TP first: the single-GPU layer is the comparison
        for i, tp in enumerate(order):    # the budget left is shared evenly among the degrees to come
            elapsed = args.budget_s - r.left_s()
            deadline = elapsed + (r.left_s() - 20) / (len(order) - i)
            lay_rows.extend(r.gather(measure_layer(r, tp, shape, layer_points(args.smoke), use_graph[0], deadline)))
            if rank == 0:
                write_csv(combine_layer(lay_rows), out / "tp_layer.csv")

    stage("check", 0, check)
    stage("allreduce", 30, allreduce)
    stage("gemm", 40, gemm)
    stage("links", 30, links)
    stage("layer", 40, layer)
    r.log("done")
    dist.barrier(group=host)
    dist.destroy_process_group()
