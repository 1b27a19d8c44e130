"""Local-SSD reads with several requests in flight, and GPUDirect Storage where the image has it.

The executor's SSD tier reads one layer at a time from one thread (`gpu.kvstore.DiskStore`), so the
profile's read table (`gpu.bench.ssd_layer_reads`) is what one request in flight gets. An NVMe drive
reaches its sequential peak only with a queue of requests; a virtual disk may not reach it at all.
This module measures how far the lent machine's disk goes with more in flight, per request size, and
whether cuFile (GPUDirect Storage, through `torch.cuda.gds`) is usable, so that a report can say what
the device's peak is, what the executor's pattern gets, and where the virtual disk limits fidelity.

* `parallel_reads`: cold O_DIRECT reads of `size` bytes at random aligned offsets of one file, from
  `depth` threads each keeping one read in flight (`os.preadv` releases the GIL), into page-aligned
  host buffers (pinned where CUDA is present): GB/s per (size, depth), plus the sequential peak (one
  reader, the largest size, in file order).
* `layer_reads_in_flight`: the executor's pattern (one session file, layer l's history at l x stride)
  read with `depth` layers in flight: GB/s per (history tokens, depth).
* `gds_probe`: whether `torch.cuda.gds.GdsFile` opens and reads a file into GPU memory here, and at
  what rate per size; the error text when it does not.
"""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from statistics import median

import torch

from gpu.kvstore import ALIGN, aligned_host_bytes, full_io, unpin

GB = 1e9


def _open_direct(path: Path, create: bool):
    """(fd, method): O_DIRECT where the file system takes it, else buffered (reads then need the page
    cache dropped: `_drop_cache`)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), "o_direct"
    except (OSError, AttributeError):
        return os.open(path, flags, 0o600), "buffered+fadvise"


def _drop_cache(fd: int, method: str) -> None:
    if method != "o_direct":
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _fill(path: Path, nbytes: int, chunk: int) -> str:
    """Write `nbytes` of noise to `path` (durable); returns the I/O method."""
    buf = aligned_host_bytes(chunk, pinned=False)
    buf.view(-1, ALIGN).copy_(torch.randint(0, 256, (ALIGN,), dtype=torch.uint8))
    fd, method = _open_direct(path, create=True)
    try:
        for off in range(0, nbytes, chunk):
            full_io(os.pwritev, fd, buf, off, min(chunk, nbytes - off))
        os.fsync(fd)
    finally:
        os.close(fd)
    return method


def _timed_threads(depth: int, work) -> float:
    """Run `work(thread index)` on `depth` threads started together; the wall time until all end."""
    start = threading.Barrier(depth + 1)
    errors = []

    def run(j):
        start.wait()
        try:
            work(j)
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread that raised it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in range(depth)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


def parallel_reads(root, sizes=(256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20), depths=(1, 2, 4, 8, 16),
                   file_bytes: int = 4 << 30, bytes_per_point: int = 1 << 30, seed: int = 0) -> dict:
    """Cold random reads of each size with `depth` in flight, and the sequential peak. Each point reads
    about `bytes_per_point` (at least one request a thread), offsets drawn without repeats per pass."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "kvsim_parallel_reads.bin"
    big = max(sizes)
    file_bytes = max(file_bytes, big * max(depths))
    file_bytes -= file_bytes % big
    method = _fill(path, file_bytes, big)
    pinned = torch.cuda.is_available()
    bufs = [aligned_host_bytes(big, pinned=pinned) for _ in range(max(depths))]
    rng = random.Random(seed)
    fd, method = _open_direct(path, create=False)
    rows = []
    try:
        # the sequential peak: one reader, the largest requests, in file order
        _drop_cache(fd, method)
        t0 = time.perf_counter()
        for off in range(0, file_bytes, big):
            full_io(os.preadv, fd, bufs[0], off, big)
        dt = time.perf_counter() - t0
        sequential = {"chunk_bytes": big, "bytes": file_bytes, "s": dt, "gbps": file_bytes / dt / GB}
        for size in sizes:
            slots = file_bytes // size
            for depth in depths:
                n = max(min(bytes_per_point // size, slots), depth)
                offs = [s * size for s in rng.sample(range(slots), min(n, slots))]
                while len(offs) < n:
                    offs.append(rng.randrange(slots) * size)
                _drop_cache(fd, method)

                def work(j, offs=offs, size=size, depth=depth):
                    buf = bufs[j]
                    for off in offs[j::depth]:
                        full_io(os.preadv, fd, buf, off, size)

                dt = _timed_threads(depth, work)
                rows.append({"chunk_bytes": size, "depth": depth, "requests": n, "bytes": n * size, "s": dt,
                             "gbps": n * size / dt / GB})
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        for b in bufs:
            unpin(b)
    return {"method": method, "path": str(root), "file_bytes": file_bytes, "sequential": sequential, "rows": rows}


def layer_reads_in_flight(root, token_bytes: int, layers: int = 32, hist_tokens=(64, 256, 1024, 4096),
                          depths=(1, 2, 4, 8), reps: int = 2) -> dict:
    """The executor's SSD pattern (`gpu.kvstore.DiskStore`: layer l's history at l x stride of one
    session file) read whole with `depth` layers in flight; GB/s per (history tokens, depth), the
    median over `reps` cold passes."""
    from gpu.kvstore import DiskStore

    cap = max(hist_tokens)
    store = DiskStore(Path(root) / "layer_reads_in_flight", layers, token_bytes)
    pinned = torch.cuda.is_available()
    bufs = [aligned_host_bytes(cap * token_bytes, pinned=pinned) for _ in range(max(depths))]
    bufs[0].view(-1, ALIGN).copy_(torch.randint(0, 256, (ALIGN,), dtype=torch.uint8))
    rows = []
    try:
        f = store.create("in_flight", cap)
        for i in range(layers):
            store.write_layer(f, i, 0, bufs[0][:cap * token_bytes])
        os.fsync(f.fd)
        method = "o_direct" if store.direct else "buffered+fadvise"
        for h in hist_tokens:
            for depth in depths:
                samples = []
                for _ in range(reps):
                    _drop_cache(f.fd, method)

                    def work(j, h=h, depth=depth):
                        for i in range(j, layers, depth):
                            store.read_layer(f, i, h, bufs[j])

                    samples.append(_timed_threads(depth, work))
                nbytes = layers * h * token_bytes
                rows.append({"hist_tokens": h, "chunk_bytes": h * token_bytes, "depth": depth, "bytes": nbytes,
                             "s": samples, "gbps": nbytes / median(samples) / GB})
    finally:
        store.close()
        for b in bufs:
            unpin(b)
    return {"method": method, "layers": layers, "token_bytes": token_bytes, "rows": rows}


def gds_probe(root, sizes=(1 << 20, 16 << 20, 64 << 20), reps: int = 3) -> dict:
    """Whether GPUDirect Storage reads work here (`torch.cuda.gds.GdsFile.load_storage` into GPU
    memory) and their rate per size; `available` False with the reason when they do not."""
    out = {"available": False, "reason": "", "rows": []}
    if not torch.cuda.is_available():
        out["reason"] = "no CUDA device"
        return out
    try:
        from torch.cuda import gds
    except ImportError as e:
        out["reason"] = f"torch.cuda.gds: {e}"
        return out
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "kvsim_gds.bin"
    big = max(sizes)
    try:
        _fill(path, big * 4, big)
        f = gds.GdsFile(str(path), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        dev = torch.empty(big, dtype=torch.uint8, device="cuda")
        try:
            gds.gds_register_buffer(dev.untyped_storage())
        except Exception as e:  # noqa: BLE001 - registration is optional for cuFile; note it
            out["register"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        for size in sizes:
            samples = []
            for r in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f.load_storage(dev[:size].untyped_storage(), (r % 4) * big)
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            out["rows"].append({"chunk_bytes": size, "s": samples, "gbps": size / median(samples) / GB})
        out["available"] = True
    except Exception as e:  # noqa: BLE001 - the point is to record why it does not work here
        out["reason"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        path.unlink(missing_ok=True)
    return out
