"""Digest of the per-turn output of every config and sweep point under configs/.

A refactor that must not move any number runs this before and after and compares the two files:

    python bench/turns_digest.py --out /tmp/before.json          # on the old commit
    python bench/turns_digest.py --out /tmp/after.json --against /tmp/before.json

`--set scheduler.kind=chunked` (repeatable) applies a key to every point (a point's own key wins);
`--no-sweeps` leaves the sweeps' points out.

Each entry is a sha256 over the point's turns table (every column, exact float bits) plus the
summary, or the one-line error the point ended with. Points run in parallel processes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _digest(item):
    name, source, overrides = item
    import pandas as pd

    from sim.config import load_config
    from sim.runner import run_simulation

    try:
        res = run_simulation(load_config(source, overrides))
    except Exception as exc:  # noqa: BLE001 - a failing point is part of the record
        return name, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    h = hashlib.sha256()
    df = res.turns
    for c in df.columns:
        col = df[c]
        h.update(c.encode())
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            h.update("\x1f".join(col.astype(str)).encode())
        else:
            h.update(col.to_numpy().tobytes())
    summ = {k: v for k, v in res.summary.items() if isinstance(v, (int, float))}
    h.update(json.dumps(summ, sort_keys=True).encode())
    return name, {"sha": h.hexdigest()[:20], "turns": len(df), "ttft_mean_s": res.summary["ttft_mean_s"]}


def items(extra: dict | None = None, sweeps: bool = True) -> list:
    out = _items(sweeps)
    if extra:
        out = [(name, src, {**extra, **ov}) for name, src, ov in out]
    return out


def _items(sweeps: bool) -> list:
    from sim.sweep import expand_points, load_sweep_spec

    out = []
    for cfg in sorted(ROOT.glob("configs/**/*.yaml")):
        rel = cfg.relative_to(ROOT).as_posix()
        if "sweeps" in cfg.parts:
            if not sweeps:
                continue
            spec = load_sweep_spec(cfg)
            for p in expand_points(spec):
                out.append((f"{rel}#{p.index}", str(spec.base), dict(p.overrides)))
        elif "hardware" in cfg.parts or "round_attention" in cfg.parts or cfg.name == "README.md":
            continue
        else:
            for pol in ("recompute", "hbm_prefix", "attentionstore"):
                out.append((f"{rel}@{pol}", str(cfg), {"policy.kind": pol}))
    # the measured profile path (profile back end, SSD contention) on the default workload
    out.append(("configs/default.yaml+h100", str(ROOT / "configs/default.yaml"),
                {"hardware_profile": str(ROOT / "configs/hardware/h100.yaml"), "gpu.name": "h100-80gb",
                 "model": "llama2-7b"}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--against", help="an earlier digest file to compare with")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key applied to every point")
    ap.add_argument("--no-sweeps", action="store_true", help="leave the sweeps' points out")
    a = ap.parse_args()
    from sim.config import parse_overrides
    work = items(parse_overrides(a.set), sweeps=not a.no_sweeps)
    with ProcessPoolExecutor(a.jobs) as ex:
        got = dict(ex.map(_digest, work, chunksize=1))
    Path(a.out).write_text(json.dumps(got, indent=1, sort_keys=True))
    print(f"{len(got)} points, {sum('error' in v for v in got.values())} ending in an error -> {a.out}")
    if a.against:
        old = json.loads(Path(a.against).read_text())
        diff = sorted(k for k in set(old) | set(got) if old.get(k) != got.get(k))
        for k in diff:
            print(f"DIFF {k}: {old.get(k)} -> {got.get(k)}")
        print(f"{len(old)} before, {len(got)} after, {len(diff)} differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
