"""Issue 15, item 5: the lent machine's local disk with several reads in flight, and GPUDirect Storage.

    python bench/gpu_ssd_parallel.py --out DIR [--root /tmp/kvsim_ssd] [--cpu-smoke]

Writes DIR/ssd_parallel.json (every sample), DIR/ssd_parallel.md (the tables). Three measurements
(gpu/ssd_parallel.py): random O_DIRECT reads per request size x requests in flight with the
sequential peak beside them; the executor's per-layer pattern (LLaMA-2-7B: 16 KiB a token a layer,
32 layers) with 1-8 layers in flight; a GPUDirect Storage probe (torch.cuda.gds). `--cpu-smoke` runs
tiny sizes anywhere (tests/test_ssd_parallel.py covers the logic).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu import ssd_parallel as sp  # noqa: E402
from gpu.bench import settle  # noqa: E402


def _mib(b) -> str:
    return f"{b / 2**20:g} MiB" if b >= 2**20 else f"{b / 2**10:g} KiB"


def tables(res: dict) -> str:
    pr, lr, gds = res["parallel"], res["layers"], res["gds"]
    depths = sorted({r["depth"] for r in pr["rows"]})
    seq = pr["sequential"]
    out = [f"# Local disk with several reads in flight ({res['device']})", "",
           f"I/O: {pr['method']}, file {pr['file_bytes'] / 2**30:g} GiB under `{pr['path']}`. "
           f"Sequential peak (one reader, {_mib(seq['chunk_bytes'])} requests in file order): "
           f"**{seq['gbps']:.2f} GB/s**.", "",
           "Random reads, GB/s by request size (rows) and requests in flight (columns):", "",
           "| request | " + " | ".join(str(d) for d in depths) + " | best / sequential |",
           "|---|" + "---|" * (len(depths) + 1)]
    for size in sorted({r["chunk_bytes"] for r in pr["rows"]}):
        row = {r["depth"]: r["gbps"] for r in pr["rows"] if r["chunk_bytes"] == size}
        out.append(f"| {_mib(size)} | " + " | ".join(f"{row[d]:.2f}" for d in depths)
                   + f" | {max(row.values()) / seq['gbps']:.2f} |")
    ld = sorted({r["depth"] for r in lr["rows"]})
    out += ["", f"The executor's pattern ({lr['layers']} layers, {lr['token_bytes'] // 1024} KiB a token a layer, "
            f"{lr['method']}), GB/s by history (rows) and layers in flight (columns):", "",
            "| history tokens (per-layer request) | " + " | ".join(str(d) for d in ld) + " |",
            "|---|" + "---|" * len(ld)]
    for h in sorted({r["hist_tokens"] for r in lr["rows"]}):
        row = {r["depth"]: r for r in lr["rows"] if r["hist_tokens"] == h}
        out.append(f"| {h} ({_mib(row[ld[0]]['chunk_bytes'])}) | " + " | ".join(f"{row[d]['gbps']:.2f}" for d in ld) + " |")
    out += ["", "GPUDirect Storage (torch.cuda.gds): " + (
        "reads into GPU memory at " + ", ".join(f"{_mib(r['chunk_bytes'])} {r['gbps']:.2f} GB/s" for r in gds["rows"])
        if gds["available"] else f"not usable here ({gds['reason']})"), ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", default="/tmp/kvsim_ssd", help="a folder on the disk to measure")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, anywhere")
    ap.add_argument("--settle-s", type=float, default=5.0, help="wait after writing before reads are timed")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if a.cpu_smoke:
        kw = dict(sizes=(64 << 10, 256 << 10), depths=(1, 4), file_bytes=8 << 20, bytes_per_point=2 << 20)
        lkw = dict(token_bytes=16384, layers=4, hist_tokens=(16, 64), depths=(1, 2), reps=1)
        gkw = dict(sizes=(1 << 20,), reps=1)
        a.settle_s = 0.0
    else:
        kw = dict(sizes=(256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20), depths=(1, 2, 4, 8, 16),
                  file_bytes=8 << 30, bytes_per_point=1 << 30)
        lkw = dict(token_bytes=16384, layers=32, hist_tokens=(64, 256, 1024, 4096), depths=(1, 2, 4, 8), reps=2)
        gkw = dict(sizes=(1 << 20, 16 << 20, 64 << 20), reps=3)
    t0 = time.perf_counter()
    res = {"device": device, "argv": sys.argv, "cpu_count": os.cpu_count()}
    settle(a.settle_s)
    res["parallel"] = sp.parallel_reads(a.root, **kw)
    print(f"parallel reads: {time.perf_counter() - t0:.1f} s", flush=True)
    res["layers"] = sp.layer_reads_in_flight(a.root, **lkw)
    print(f"layer reads: {time.perf_counter() - t0:.1f} s", flush=True)
    res["gds"] = sp.gds_probe(a.root, **gkw)
    res["wall_s"] = time.perf_counter() - t0
    tmp = out / "ssd_parallel.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out / "ssd_parallel.json")
    md = tables(res)
    (out / "ssd_parallel.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
