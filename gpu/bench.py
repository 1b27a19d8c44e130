"""Microbenchmarks of the costs the simulator needs: host links, local SSD, and decoder-layer compute.

Method (/work/.library/device/METHOD.md): warm up first, time the GPU with CUDA
events, repeat and take medians, fresh random inputs before every timed repeat (never zeros: they can
run faster than real data). Layer times run the executor's own code, CUDA-graph replays of the same
bodies (`gpu.prefill_graph`, `gpu.decode_graph`), over a stack of `STACK` layers and divide, because
a serving step runs layers back to back. (Eager layers would time the host's kernel-launch rate, not
the GPU: measurements in results/gpu/README.md.)

Every function returns plain dicts/lists (the raw samples) so `gpu.calibrate` can both keep them and
reduce them to the profile's tables.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from gpu import model as M
from gpu.kvstore import ALIGN, aligned_host_bytes, full_io, unpin
from sim.models import ModelShape
from sim.units import GB, MS

STACK = 8                                   # layers timed back to back per sample
LINK_CHUNKS = [1 << k for k in range(18, 31)]      # 256 KiB .. 1 GiB
SSD_CHUNKS = [1 << k for k in (18, 20, 22, 24, 26, 28, 30)]


def _reps(nbytes: int) -> int:
    return 20 if nbytes <= 1 << 24 else (8 if nbytes <= 1 << 28 else 4)


def median(xs) -> float:
    return float(statistics.median(xs))


def time_cuda_ms(fn, setup=None, warmup: int = 2, reps: int = 7, align=None, idle_ratio: float = 0.0) -> list[float]:
    """Event-timed samples of fn(); `setup` (fresh inputs) runs before each, outside the timed span.

    `align` (tensor parallelism) lines the ranks up before each sample, so that no rank's sample holds
    its wait for a later one at the first all-reduce. `idle_ratio`: after each sample the GPU idles
    that many times the sample's time, so compute-bound samples run at the clock a served one starts
    from rather than at the power-capped clock of back-to-back ones. Without CUDA (CPU tests), the
    host clock.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for r in range(warmup + reps):
        arg = setup() if setup else None
        if align is not None:
            align()
        if not cuda:
            t0 = time.perf_counter()
            fn(arg)
            ms = (time.perf_counter() - t0) / MS
        else:
            torch.cuda.synchronize()
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        if r >= warmup:
            out.append(ms)
        if idle_ratio > 0:
            time.sleep(idle_ratio * ms * MS)
    return out


# ------------------------------------------------------------------------ GPU ceilings
def gpu_peaks() -> dict:
    """Measured ceilings: bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = time_cuda_ms(lambda _: a @ b, warmup=3, reps=10)
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)   # 1 GiB
    dst = torch.empty_like(src)
    cp = time_cuda_ms(lambda _: dst.copy_(src), warmup=3, reps=10)
    return {"matmul_ms": mm, "copy_ms": cp,
            "peak_bf16_flops": 2 * n ** 3 / (median(mm) * MS),
            "hbm_bw_gbps": 2 * src.numel() * 2 / (median(cp) * MS) / GB,
            "hbm_bytes": torch.cuda.get_device_properties(0).total_memory}


# ------------------------------------------------------------------------ host links
def link_bandwidth(chunks=LINK_CHUNKS) -> dict:
    """H2D and D2H, pinned and pageable, per chunk size; GB/s = 1e9 B/s.

    Pinned copies are timed with CUDA events. A pageable copy goes through the driver's staging
    buffer and blocks the host, so it is timed with the host clock around a synchronised copy.
    """
    top = max(chunks)
    dev = torch.empty(top, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(top, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(top, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1 << 24,), dtype=torch.uint8)
    for t in (pinned, pageable):               # touch every page; random bytes, not zeros
        t.view(-1, noise.numel()).copy_(noise) if top >= noise.numel() else t.copy_(noise[:top])
    dev.copy_(pinned)
    out = {}
    for name, host, h2d in (("h2d_pinned", pinned, True), ("d2h_pinned", pinned, False),
                            ("h2d_pageable", pageable, True), ("d2h_pageable", pageable, False)):
        rows = []
        for c in chunks:
            d, h = dev[:c], host[:c]
            fn = (lambda _, d=d, h=h: d.copy_(h, non_blocking=True)) if h2d else \
                 (lambda _, d=d, h=h: h.copy_(d, non_blocking=True))
            if name.endswith("pinned"):
                ms = time_cuda_ms(fn, warmup=2, reps=_reps(c))
            else:
                ms = []
                for r in range(2 + _reps(c)):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn(None)
                    torch.cuda.synchronize()
                    if r >= 2:
                        ms.append((time.perf_counter() - t0) / MS)
            rows.append({"chunk_bytes": c, "ms": ms, "gbps": c / (median(ms) * MS) / GB})
        out[name] = rows
    del dev, pinned, pageable
    return out


# ------------------------------------------------------------------------ local SSD
def ssd_bandwidth(root, chunks=SSD_CHUNKS, min_bytes: int = 1 << 28) -> dict:
    """Sequential write and cold read of a file on local disk, per request size.

    Cold reads: O_DIRECT (aligned buffer, offsets and sizes) so the page cache is bypassed; where the
    file system refuses O_DIRECT, buffered I/O with fsync + posix_fadvise(DONTNEED) before each read
    pass. `method` says which was used. Writes are timed up to the end of fsync (durable).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "kvsim_ssd_bench.bin"
    total = max(max(chunks), min_bytes)
    buf = aligned_host_bytes(max(chunks), pinned=torch.cuda.is_available())
    noise = torch.randint(0, 256, (ALIGN,), dtype=torch.uint8)
    buf.view(-1, ALIGN).copy_(noise)
    method = "o_direct"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        full_io(os.pwritev, fd, buf[:ALIGN], 0)
    except OSError:
        method = "fadvise_dontneed"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    res = {"method": method, "path": str(root), "write": [], "read": []}
    try:
        for c in chunks:
            n = max(total // c, 1)
            t0 = time.perf_counter()
            for i in range(n):
                full_io(os.pwritev, fd, buf[:c], i * c)
            os.fsync(fd)
            dt = time.perf_counter() - t0
            res["write"].append({"chunk_bytes": c, "bytes": n * c, "s": dt, "gbps": n * c / dt / GB})
        for c in chunks:
            n = max(total // c, 1)
            samples = []
            for _ in range(2):
                if method != "o_direct":
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                for i in range(n):
                    full_io(os.preadv, fd, buf[:c], i * c)
                samples.append(time.perf_counter() - t0)
            dt = median(samples)
            res["read"].append({"chunk_bytes": c, "bytes": n * c, "s": samples, "gbps": n * c / dt / GB})
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        unpin(buf)
    return res


def settle(seconds: float) -> None:
    """Let the disk finish what earlier writes left behind before a read is timed: on the lent VMs
    a guest's O_DIRECT writes can still be flushed below it (layer reads timed right after a multi-GB
    write burst ran at two thirds of the speed the executor later got from the same disk:
    results/gpu/README.md)."""
    os.sync()
    time.sleep(seconds)


def ssd_layer_reads(root, token_bytes: int, layers: int = 32, hist_tokens=(16, 64, 256, 1024, 4096),
                    reps: int = 2, settle_s: float = 3.0) -> dict:
    """Cold reads the way the executor's SSD tier reads (gpu.kvstore.DiskStore): one session file,
    layer l's tokens at l * stride, each layer's history [0, h) read by one O_DIRECT preadv into a
    pinned buffer, layer after layer. Per-layer chunk = h * token_bytes.

    Sequential reads of one file (`ssd_bandwidth`) ran 1.5-2x faster on the lent machine's virtual
    disk than this strided pattern (first graph-prefill run: isolated SSD turns 30-40% slower than a
    cost model fed the sequential figures), so the profile's read table comes from this one.
    """
    from gpu.kvstore import DiskStore

    cap = max(hist_tokens)
    store = DiskStore(Path(root) / "layer_reads", layers, token_bytes)
    buf = aligned_host_bytes(cap * token_bytes, pinned=torch.cuda.is_available())
    noise = torch.randint(0, 256, (ALIGN,), dtype=torch.uint8)
    buf.view(-1, ALIGN).copy_(noise)
    rows = []
    try:
        f = store.create("calibration", cap)
        for i in range(layers):
            store.write_layer(f, i, 0, buf[:cap * token_bytes])
        os.fsync(f.fd)
        settle(settle_s)
        for h in hist_tokens:
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(layers):
                    store.read_layer(f, i, h, buf)
                samples.append(time.perf_counter() - t0)
            rows.append(_layer_rate(h * token_bytes, layers, samples))
    finally:
        store.close()
        unpin(buf)
    return {"method": "o_direct" if store.direct else "buffered+fadvise", "layers": layers,
            "token_bytes": token_bytes, "rows": rows}


def _layer_rate(chunk: int, layers: int, samples: list[float]) -> dict:
    """One row of a per-layer I/O table: `layers` requests of `chunk` bytes took `samples` seconds."""
    return {"chunk_bytes": chunk, "bytes": layers * chunk, "s": samples, "gbps": layers * chunk / median(samples) / GB}


def ssd_layer_writes(root, token_bytes: int, layers: int = 32, new_tokens=(16, 64, 256, 1024, 4096),
                     reps: int = 2) -> dict:
    """Writes the way the executor saves a turn (gpu.executor, SSD tier): one O_DIRECT write per
    layer of the turn's new tokens into the session's file (layer l at l * stride, a region never
    written before). The executor's per-layer writes measured 1.3-2.4x slower than `ssd_bandwidth`'s
    sequential ones of the same size (results/gpu/README.md), so the profile's write table comes from this.
    """
    from gpu.kvstore import DiskStore

    cap = max(new_tokens)
    store = DiskStore(Path(root) / "layer_writes", layers, token_bytes)
    buf = aligned_host_bytes(cap * token_bytes, pinned=torch.cuda.is_available())
    buf.view(-1, ALIGN).copy_(torch.randint(0, 256, (ALIGN,), dtype=torch.uint8))
    rows = []
    try:
        for n in new_tokens:
            samples = []
            for r in range(reps):
                f = store.create(f"w{n}_{r}", cap)
                t0 = time.perf_counter()
                for i in range(layers):
                    store.write_layer(f, i, 0, buf[:n * token_bytes])
                store.finish_writes(f)
                samples.append(time.perf_counter() - t0)
            rows.append(_layer_rate(n * token_bytes, layers, samples))
    finally:
        store.close()
        unpin(buf)
    return {"method": "o_direct" if store.direct else "buffered+fsync", "layers": layers,
            "token_bytes": token_bytes, "rows": rows}


def ssd_read_under_write(root, token_bytes: int, layers: int = 32, pairs=((256, 1024), (64, 2048), (1024, 256)),
                         lead_s: float = 0.005, reps: int = 2, settle_s: float = 1.0) -> dict:
    """How do reads and writes slow each other? The executor's pattern: a writer thread appends a
    turn's KV (one O_DIRECT write per layer of `write_tokens` tokens) while the next turn reads its
    history (one read per layer of `read_tokens` tokens), `lead_s` after the writes started; for each
    (read_tokens, write_tokens) in `pairs`: read alone, write alone, read under the write.

    Raw samples only: `gpu.calibrate.ssd_contention_fit` reduces them to the profile's
    `ssd.contention` (the model of `sim.costmodel.CONTENTION` nearest them).
    """
    import threading

    from gpu.kvstore import DiskStore

    store = DiskStore(Path(root) / "read_under_write", layers, token_bytes)
    cap = max(max(p) for p in pairs)
    rbuf = aligned_host_bytes(cap * token_bytes, pinned=torch.cuda.is_available())
    wbuf = aligned_host_bytes(cap * token_bytes, pinned=torch.cuda.is_available())
    noise = torch.randint(0, 256, (ALIGN,), dtype=torch.uint8)
    rbuf.view(-1, ALIGN).copy_(noise)
    wbuf.view(-1, ALIGN).copy_(noise)

    def write_all(f, n):
        for i in range(layers):
            store.write_layer(f, i, 0, wbuf[:n * token_bytes])
        store.finish_writes(f)

    def read_all(f, n):
        for i in range(layers):
            store.read_layer(f, i, n, rbuf)

    rows = []
    try:
        hist = store.create("history", cap)
        for i in range(layers):
            store.write_layer(hist, i, 0, wbuf[:cap * token_bytes])
        os.fsync(hist.fd)
        k = 0
        for rt, wt in pairs:
            out = {"read_tokens": rt, "write_tokens": wt, "read_alone_s": [], "write_alone_s": [],
                   "read_under_write_s": [], "write_under_read_s": []}
            for _ in range(reps):
                settle(settle_s)
                t0 = time.perf_counter()
                read_all(hist, rt)
                out["read_alone_s"].append(time.perf_counter() - t0)
                f = store.create(f"w{k}", cap)
                k += 1
                t0 = time.perf_counter()
                write_all(f, wt)
                out["write_alone_s"].append(time.perf_counter() - t0)
                f2 = store.create(f"w{k}", cap)
                k += 1
                done = {}

                def writer(f2=f2, wt=wt):
                    t = time.perf_counter()
                    write_all(f2, wt)
                    done["w"] = time.perf_counter() - t
                th = threading.Thread(target=writer)
                th.start()
                time.sleep(lead_s)
                t0 = time.perf_counter()
                read_all(hist, rt)
                out["read_under_write_s"].append(time.perf_counter() - t0)
                th.join()
                out["write_under_read_s"].append(done["w"])
            rows.append(out)
    finally:
        store.close()
        unpin(rbuf)
        unpin(wbuf)
    return {"rows": rows, "layers": layers, "token_bytes": token_bytes, "lead_s": lead_s}


def serving_overheads(shape: ModelShape, new_tokens=(64, 384, 1536), hist_tokens: int = 256,
                      reps: int = 7, idle_s: float = 0.03, seed: int = 3, device: str = "cuda",
                      model: M.Decoder | None = None) -> dict:
    """The real executor's prefill on an idle GPU, for the host time the layer and head tables miss.

    Recompute turns with no history (first token's wall time, start of the turn -> token on the
    host), DRAM turns that load a short history first (the per-layer copy's fixed cost) and the same
    with layer-wise preload (loading hides under compute, so what is left over is the per-layer
    gating). `gpu.calibrate.serving_terms` reduces them against the tables measured in the same call. The shapes are padding
    buckets, so no interpolation enters the residual.
    """
    from gpu.executor import Executor, ServePlan, collector_off_turns, prompt_ids
    from gpu.isolated import run_grid

    max_pos = max(new_tokens) + hist_tokens + 4096
    cuda = device == "cuda"
    own = model is None        # a TP run passes its sharded model (a second copy would not fit)
    if own:
        model = M.random_decoder(shape, max_pos, device, torch.bfloat16 if cuda else torch.float32, seed=seed)
    rows = []
    try:
        ex = Executor(model, ServePlan("recompute"), max_ctx=max(new_tokens) + 8, max_new=max(new_tokens) + 8,
                      decode="eager")
        ex.open_session("s", max(new_tokens) + 8)
        for n in new_tokens:
            ex.prepare_shape("s", 0, n)
            ids = prompt_ids("s", 0, n, shape.vocab)
            with collector_off_turns():
                for r in range(reps + 1):
                    ex.sessions["s"].tokens = []
                    if cuda:
                        torch.cuda.synchronize()
                    time.sleep(idle_s)
                    clock0 = time.perf_counter()
                    t = ex.run_turn("s", r, ids, 1, 0.0, clock0)
                    if r:
                        rows.append({"tier": "recompute", "overlap": False, "read_buffer_layers": 1,
                                     "history_tokens": 0, "new_tokens": n,
                                     "prefill_ms": (t.first_token_s - t.start_s) / MS})
        ex.close()
        del ex
        grid = run_grid(model, [ServePlan("dram", overlap=False), ServePlan("dram", overlap=True, read_buffer_layers=2)],
                        [hist_tokens], list(new_tokens), reps=reps, log=lambda *_: None, idle_s=idle_s)
        for g in grid.itertuples():
            rows.append({"tier": "dram", "overlap": bool(g.overlap), "read_buffer_layers": int(g.read_buffer_layers),
                         "history_tokens": hist_tokens, "new_tokens": int(g.prompt_tokens),
                         "prefill_ms": (g.first_token_s - g.start_s) / MS})
    finally:
        del model
        if cuda:
            torch.cuda.empty_cache()
    return {"rows": rows, "idle_s": idle_s, "method": "gpu.executor.Executor.run_turn, host clock"}


def served_gaps(model: M.Decoder, agree=None, sessions: int = 4, turns: int = 3, prompt_tokens: int = 64,
                output_tokens: int = 4) -> dict:
    """The serving loop's host time between turns, on queued turns served back to back.

    A synthetic trace (every session's first turn at 0, each next turn 0 s after its reply: every turn
    queues) goes through the executor's own loop (`gpu.executor.serve_trace`, recompute, the ranks
    agreeing through `agree` as in a TP trace run). Each row is one turn on this process's clock;
    `gpu.calibrate.next_turn_gap_ms` takes the time from a turn's end to the next turn's start after
    turns whose session goes on (`continues`: their end is agreed on, which schedules that next turn).
    The idle probes of `serving_overheads` cannot see it: their turns have no next turn.
    """
    import pandas as pd

    trace = pd.DataFrame([{"session_id": f"gap{s}", "turn": k, "arrival_s": 0.0 if k == 0 else float("nan"),
                           "think_s": float("nan") if k == 0 else 0.0, "prompt_tokens": prompt_tokens,
                           "output_tokens": output_tokens, "prefix_hashes": None}
                          for s in range(sessions) for k in range(turns)])
    df = _serve_recompute(model, trace, agree)
    last = df.groupby("session_id").turn.transform("max")
    rows = [{"session_id": r.session_id, "turn": int(r.turn), "arrival_s": float(r.arrival_s),
             "start_s": float(r.start_s), "first_token_s": float(r.first_token_s), "end_s": float(r.end_s),
             "continues": bool(r.turn < lt)} for r, lt in zip(df.itertuples(), last)]
    return {"rows": rows, "method": "gpu.executor.serve_trace, recompute, queued turns; host clock"}


def decode_probes(model: M.Decoder, agree=None, prompts=(64, 1024, 4096), output_tokens: int = 32,
                  reps: int = 3) -> dict:
    """Replies decoded right after prefills of several lengths, as the executor serves queued turns.

    A synthetic trace of one-turn sessions, `reps` of each prompt length in `prompts`, all arriving at 0
    (every turn queues behind the one before, so each prefill follows the previous turn's decode and
    each decode follows its own prefill, as in a trace run at load), through the executor's own loop
    (`gpu.executor.serve_trace`, recompute, the ranks agreeing through `agree`). Each row is one turn on
    this process's clock; `gpu.calibrate.decode_after_prefill` takes what each decode (first token ->
    end) took beyond the decode tables, over the prefill before it (start -> first token). The decode
    tables time decode steps after decode steps (`decode_step_grid`): a turn's decode right after a
    compute-bound prefill is what they cannot see (run 21: 0.6% a step, more after longer prefills).
    """
    import pandas as pd

    trace = pd.DataFrame([{"session_id": f"dap{p}_{r}", "turn": 0, "arrival_s": 0.0, "think_s": float("nan"),
                           "prompt_tokens": int(p), "output_tokens": int(output_tokens), "prefix_hashes": None}
                          for r in range(reps) for p in prompts])
    df = _serve_recompute(model, trace, agree)
    rows = [{"session_id": r.session_id, "prompt_tokens": int(r.history_tokens + r.new_tokens),
             "output_tokens": int(r.output_tokens),
             "start_s": float(r.start_s), "first_token_s": float(r.first_token_s), "end_s": float(r.end_s)}
            for r in df.itertuples()]
    return {"rows": rows, "method": "gpu.executor.serve_trace, recompute, one-turn sessions queued; host clock"}


def _serve_recompute(model: M.Decoder, trace, agree=None):
    """`trace` served by the executor's own loop over `model` (recompute, the ranks agreeing through
    `agree`), its executor closed and its memory handed back: the per-turn frame of `serve_trace`."""
    from gpu.executor import executor_for_trace, serve_trace
    from gpu.plans import PLANS

    ex = executor_for_trace(model, PLANS["recompute"], trace)
    try:
        df = serve_trace(ex, trace, agree=agree)
    finally:
        ex.close()
    del ex
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return df


# ------------------------------------------------------------------------ decoder layers
def _stack_model(shape: ModelShape, max_pos: int, seed: int = 0, device: str = "cuda", reduce=None) -> M.Decoder:
    # One layer's weights suffice: they (hundreds of MB) are far larger than L2, so re-running the
    # same layer STACK times reads them from HBM every time, as distinct layers would. Under tensor
    # parallelism `shape` is the rank's shard and `reduce` its all-reduce (gpu/tp_executor.py).
    return M.random_decoder(shape, max_pos, device, _dtype(device), seed=seed, layers=1, reduce=reduce)


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def per_layer_ms(samples_ms: list[float], layers_per_sample: int) -> float:
    """A per-layer table entry from samples that each ran `layers_per_sample` layers back to back."""
    return median(samples_ms) / layers_per_sample


def prefill_layer_grid(shape: ModelShape, new_tokens: list[int], history_tokens: list[int], device: str = "cuda",
                       reduce=None, align=None, passes: int = 1, reps: tuple[int, int] | None = None,
                       idle_ratio: float = 0.0) -> dict:
    """ms of one decoder layer prefilling n new tokens after h cached ones, batch 1, as the executor
    runs it: the per-layer CUDA graphs of `gpu.prefill_graph`, at shape (n, h + n) exactly.

    `new_tokens` are padding buckets (the executor never runs another n); `history_tokens` need not be
    multiples of the key padding: the cost model interpolates between them at the padded key count.

    A sample replays the stack's STACK layer graphs `passes` times back to back (`passes` = layers /
    STACK: as many layer launches as the executor's whole prefill). What a sample pays once (the
    launch before its first kernel and, under tensor parallelism, the ranks' skew at its first
    all-reduce, after `align` lined them up on the host) is then spread over as many layers as in a
    served prefill, not over STACK: at TP 4 that once-per-sample cost was ~0.1 ms, 12 us of every
    8-layer sample's layer (run 14, results/gpu/run17_tp4/README.md). `reps`: (warm-up, timed) samples.
    `idle_ratio` (`time_cuda_ms`): the GPU idles after each sample, as a served prefill follows a decode
    (run 27: back-to-back samples for ~48 s drew 605-676 W at 1,797-1,881 MHz on average, served
    prefills started at ~1,975 MHz, and the table came out 0.4-0.8% slow).
    """
    from gpu.prefill_graph import PrefillGraphs

    ctx = max(new_tokens) + max(history_tokens)
    model = _stack_model(shape, ctx, device=device, reduce=reduce)
    # a cache layer per stacked layer, as in the executor: one shared layer would stay in L2 (50 MB)
    cache = torch.zeros((STACK, 1, ctx, 2, shape.kv_heads, shape.head_dim), device=device, dtype=model.dtype)
    rows = []
    for n in new_tokens:
        pg = PrefillGraphs(model, n, stack=[(0, i) for i in range(STACK)])
        for h in history_tokens:
            def setup(n=n, h=h, pg=pg):
                cache[:, :, :h].normal_()
                pg.begin_shape(torch.randint(0, shape.vocab, (1, n), device=device), h, cache, n, n + h)

            def run(_, pg=pg):
                for _ in range(passes):
                    for i in range(STACK):
                        pg.layer(i)
            warm, timed = reps or (2, 9 if n <= 512 else 5)
            ms = time_cuda_ms(run, setup, warmup=warm, reps=timed, align=align, idle_ratio=idle_ratio)
            rows.append({"new_tokens": n, "history_tokens": h, "stack_ms": ms, "passes": passes,
                         "ms": per_layer_ms(ms, STACK * passes)})
        del pg
        _empty_cache(device)
    return {"rows": rows, "new_tokens": new_tokens, "history_tokens": history_tokens, "idle_ratio": idle_ratio,
            "method": "cuda_graph" if passes == 1 else f"cuda_graph, {STACK} layers x {passes} passes a sample"}


def _empty_cache(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def decode_layer_grid(shape: ModelShape, batch: list[int], context_tokens: list[int],
                      mem_cap_bytes: float = 20e9, device: str = "cuda", reduce=None, align=None) -> dict:
    """ms of one decoder layer in one decode step: B sequences, each attending over `ctx` tokens.

    Timed the way the executor decodes: CUDA-graph replays (gpu.decode_graph), a stack of STACK
    layers plus the head in one graph, minus a graph of the head alone; the head's own time is kept
    as head_ms.decode. Context values should be multiples of the executor's graph bucket (256), so
    the bucket timed is the context itself.
    """
    from gpu.decode_graph import DecodeGraphs

    model = _stack_model(shape, max(context_tokens), device=device, reduce=reduce)
    rows, heads = [], {}
    tok_bytes = shape.kv_bytes_per_token_layer
    for b in batch:
        for c in context_tokens:
            if b * c * tok_bytes > mem_cap_bytes:
                raise ValueError(f"decode grid point b={b} ctx={c} needs more than {mem_cap_bytes:.0f} bytes")
            cache = M.new_kv_cache(shape, 1, b, c, device, model.dtype)
            cache.normal_()
            layers = DecodeGraphs(model, [cache], batch=b, stack=[(0, 0)] * STACK, buckets=[c])
            only_head = DecodeGraphs(model, [cache], batch=b, stack=[], buckets=[c])

            def setup(b=b, layers=layers, only_head=only_head):   # fresh tokens each repeat
                layers.cur.copy_(torch.randint(0, shape.vocab, (b, 1), device=device))
                only_head.cur.copy_(layers.cur)
            t_all = time_cuda_ms(lambda _, g=layers, c=c: g.step(0, c - 1), setup, warmup=3, reps=9, align=align)
            t_head = time_cuda_ms(lambda _, g=only_head, c=c: g.step(0, c - 1), setup, warmup=3, reps=9, align=align)
            heads.setdefault(b, []).extend(t_head)
            rows.append({"batch": b, "context_tokens": c, "stack_ms": t_all, "head_ms": t_head,
                         "ms": (median(t_all) - median(t_head)) / STACK})
            del layers, only_head, cache
        _empty_cache(device)
    return {"rows": rows, "batch": batch, "context_tokens": context_tokens,
            "head": [{"batch": b, "samples_ms": v, "ms": median(v)} for b, v in heads.items()],
            "method": "cuda_graph"}


def decode_layer_from_steps(step_ms: list[float], head_step_ms: list[float], layers: int) -> float:
    """Per-layer decode time from per-step samples of the whole model (`layers` layers + head) and of
    the head alone: (median step - median head step) / layers, so that layers x table + head = step."""
    return (median(step_ms) - median(head_step_ms)) / layers


def decode_step_grid(model: M.Decoder, batch: list[int], context_tokens: list[int], steps: int = 16,
                     reps: tuple[int, int] = (2, 5), align=None, mem_cap_bytes: float = 20e9) -> dict:
    """ms of one decoder layer in one decode step, from whole decode steps of `model` run the way the
    executor runs a reply (gpu.executor.Executor.run_turn): `steps` replays back to back of the graph
    of every layer plus the head (`gpu.decode_graph.DecodeGraphs` over the model's own layers), each
    step's token copied out as the executor keeps it, no host sync in between; a sample's time / steps
    is one step. The head alone (embedding, final norm, LM head, argmax) is timed the same way; the
    table holds (step - head) / layers and head_ms.decode the head's step, so the simulator's step
    (layers x table + head) is the measured step.

    Why not `decode_layer_grid`'s stack of STACK layers aligned before each sample: under tensor
    parallelism each such sample pays the ranks' skew at its first all-reduce once, ~0.1 ms at TP 4,
    which became 12-14 us of every layer (+5% a step against the executor's steady replays, run 14).
    Here the ranks are aligned once per sample of `steps` x layers. Context values should be
    multiples of the executor's graph bucket (256), so the bucket timed is the context itself.
    """
    from gpu.decode_graph import DecodeGraphs

    shape, dev = model.shape, model.device
    L = len(model.layers)
    if max(context_tokens) > model.rope_cos.shape[0]:
        raise ValueError(f"decode grid: context {max(context_tokens)} past the model's RoPE table "
                         f"({model.rope_cos.shape[0]} positions): build it with max_pos >= {max(context_tokens)}")
    rows, heads = [], {}
    warm, timed = reps
    for b in batch:
        for c in context_tokens:
            if steps + 1 > c:
                raise ValueError(f"decode grid point ctx={c}: {steps} steps need a context of at least {steps + 1}")
            if L * b * c * shape.kv_bytes_per_token_layer > mem_cap_bytes:
                raise ValueError(f"decode grid point b={b} ctx={c} needs more than {mem_cap_bytes:.0f} bytes")
            cache = M.new_kv_cache(shape, L, b, c, dev, model.dtype)
            cache.normal_()
            toks = torch.empty(steps, b, dtype=torch.long, device=dev)
            per = {}
            for name, stack in (("step", None), ("head", [])):
                g = DecodeGraphs(model, [cache], batch=b, stack=stack, buckets=[c])

                def setup(g=g, b=b):        # fresh tokens each sample
                    g.cur.copy_(torch.randint(0, shape.vocab, (b, 1), device=dev))

                def run(_, g=g, c=c):
                    for j in range(steps):  # the positions of a reply's last steps in the bucket
                        toks[j] = g.step(0, c - 1 - steps + j)[:, 0]
                per[name] = [ms / steps for ms in time_cuda_ms(run, setup, warmup=warm, reps=timed, align=align)]
                del g
            heads.setdefault(b, []).extend(per["head"])
            rows.append({"batch": b, "context_tokens": c, "steps": steps, "step_ms": per["step"],
                         "head_step_ms": per["head"], "ms": decode_layer_from_steps(per["step"], per["head"], L)})
            del cache, toks
        _empty_cache(dev)
    return {"rows": rows, "batch": batch, "context_tokens": context_tokens,
            "head": [{"batch": b, "samples_ms": v, "ms": median(v)} for b, v in heads.items()],
            "method": f"cuda_graph steps of all {L} layers + head, {steps} back to back a sample"}


def head_times(shape: ModelShape, new_tokens: list[int], batch: list[int], device: str = "cuda") -> dict:
    """A prefill's cost outside its layers, for n new tokens and no history, as the executor pays it
    (gpu.prefill_graph): the host turns the token ids into a device tensor, replays the "begin" graph
    (positions, RoPE rows, embedding) and the "end" graph (final norm + lm_head on the last real token
    + argmax), and waits for the token. Timed on the host clock from an idle GPU, because that is what
    it adds to a TTFT: host work before the GPU starts and the wake-up after it ends included (GPU
    events alone would miss them: -2% on every isolated turn of the first graph-prefill run).
    Decode: the eager head, for reference only (decode_layer_grid times the graphed head)."""
    from gpu.prefill_graph import PrefillGraphs

    model = M.random_decoder(shape, max(new_tokens) + 16, device, _dtype(device), layers=0)
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = torch.zeros((0, 1, max(new_tokens), 2, shape.kv_heads, shape.head_dim), device=device,
                        dtype=model.dtype)
    pre, dec = [], []
    for n in new_tokens:
        pg = PrefillGraphs(model, n, stack=[])
        wall = []
        for r in range(3 + 9):
            ids = torch.randint(0, shape.vocab, (n,)).tolist()      # the executor holds ids as a list
            sync()
            t0 = time.perf_counter()
            pg.begin_shape(torch.tensor([ids], dtype=torch.long).to(device), 0, cache, n, n)
            int(pg.end()[1].item())
            if r >= 3:
                wall.append((time.perf_counter() - t0) / MS)
        gpu = time_cuda_ms(lambda ids, pg=pg, n=n: (pg.begin_shape(ids, 0, cache, n, n), pg.end()),
                           lambda: torch.randint(0, shape.vocab, (1, n), device=device), warmup=2, reps=7)
        pre.append({"new_tokens": n, "samples_ms": wall, "ms": median(wall), "gpu_ms": median(gpu)})
        del pg
    for b in batch:
        def setup(b=b):
            return torch.randint(0, shape.vocab, (b, 1), device=device)
        ms = time_cuda_ms(lambda ids: M.head(model, M.embed(model, ids)[:, -1]).argmax(-1, keepdim=True),
                          setup, warmup=2, reps=7)
        dec.append({"batch": b, "samples_ms": ms, "ms": median(ms)})
    return {"prefill": pre, "decode": dec, "method": "cuda_graph; prefill on the host clock"}
