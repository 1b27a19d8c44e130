"""Wide fuzz of the `kvsim` command line: every config leaf and every argument with bad values.

Each case runs `python -m sim.cli ...` in its own subprocess (own temp folder, a per-case timeout, a
memory limit) and lands in one class:

  clean       exit 2 and one stderr line, no traceback (the promised answer to bad input)
  accepted    exit 0/1 for a value that is legal
  silent      exit 0/1 for a value that is physically meaningless (NaN, inf, negative size, 1e308 ...)
  refused     exit 2 for a value that is legal (a spurious error)
  messy       exit 2 but several stderr lines
  traceback   a Python traceback, or any other exit status (a crash)
  hang        still running at the timeout

    python bench/fuzz_cli.py --jobs 2                  # default.yaml leaves + every argument, paper/base sampled
    python bench/fuzz_cli.py --jobs 2 --sample 1       # everything
    python bench/fuzz_cli.py --only args --show accepted

Prints the counts and every case that is not clean/accepted with its exact command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("configs/default.yaml", "configs/paper/base.yaml")
BAD_CLASSES = ("silent", "refused", "messy", "traceback", "hang")
MEMORY_LIMIT = 4 * 2**30  # a case that tries to build a 1e12-element ladder fails instead of eating the host

# (label, YAML text given to --set KEY=...) for every config leaf and section
LEAF_VALUES = [
    ("mapping", "{a: 1}"), ("string", "abc"), ("bool", "true"), ("NaN", ".nan"), ("nan-string", "nan"),
    ("+inf", ".inf"), ("-inf", "-.inf"), ("inf-string", "inf"), ("zero", "0"), ("negative", "-1"),
    ("1e308", "1e308"), ("2^64", "18446744073709551616"), ("empty-string", "''"), ("list", "[1, 2]"),
    ("null", ""),
]
TINY = "workload.max_sessions=3"
SHAPE_7B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
            "max_context_tokens": 4096}


@dataclasses.dataclass
class Case:
    group: str
    argv: list  # str, or bytes for arguments that are not UTF-8
    bad: bool   # the value is physically meaningless: exit 0 would be a silent acceptance
    what: str = ""


# ---------------------------------------------------------------- which values are legal

def _parse(text: str):
    from sim.errors import parse_yaml
    return parse_yaml(text)


def leaf_value_is_legal(key: str, meta: dict, tp, value) -> bool:
    """Whether `value` is physically meaningful for a config leaf (independently of the loader):
    the type the field needs, finite, within the knob's stated bounds, one of its choices."""
    from typing import Union, get_args, get_origin
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        tp = next(a for a in get_args(tp) if a is not type(None))
    if value is None:
        return optional or dataclasses.is_dataclass(tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict) and not value  # {} is "every default"; {a: 1} is an unknown key
    if meta.get("size"):
        if isinstance(value, bool):
            return False
        if isinstance(value, str):
            return False  # the values fuzzed here as strings are never sizes
        num = float(value) if isinstance(value, (int, float)) else math.nan
    elif tp is bool:
        return isinstance(value, bool)
    elif tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if tp is int and not float(value).is_integer():
            return False
        num = float(value)
    else:  # str
        if not isinstance(value, str) or not value.strip():
            return False
        if meta.get("choices") is not None:
            return value in meta["choices"]
        if key == "name":
            return bool(meta["pattern"].match(value))
        return False  # model, trace, hardware_profile: the fuzzed strings name nothing that exists
    if not math.isfinite(num):
        return False
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    lo, hi = meta.get("lo"), meta.get("hi")
    return lo is None or lo <= num <= hi


def config_leaves():
    """(dotted key, metadata, type) of every leaf and section of Config."""
    from typing import Union, get_args, get_origin, get_type_hints

    from sim.config import Config

    def walk(cls, prefix):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            key, tp = f"{prefix}{f.name}", hints[f.name]
            inner = tp
            if get_origin(tp) is Union:
                inner = next(a for a in get_args(tp) if a is not type(None))
            yield key, dict(f.metadata), tp
            if dataclasses.is_dataclass(inner):
                yield from walk(inner, f"{key}.")
    return list(walk(Config, ""))


def leaf_cases(config: str, tiny_trace: str) -> list[Case]:
    cases = []
    for key, meta, tp in config_leaves():
        base = [TINY]
        if key == "workload.max_sessions":
            base = [f"workload.trace={tiny_trace}"]
        if key == "gpu.expert_parallel":
            # legal only where it means something: a MoE model on several GPUs (one GPU or a dense model is a
            # one-line error, tested in tests/test_expert_parallel.py)
            base = [TINY, "model=qwen3-30b-a3b", "gpu.count=2"]
        if key.startswith("model_shape"):
            base += ["model=mine"] + [f"model_shape.{k}={v}" for k, v in SHAPE_7B.items()
                                      if f"model_shape.{k}" != key]
            if key == "model_shape":
                base = [TINY, "model=mine"]
        for label, text in LEAF_VALUES:
            # with model=mine, model_shape must be a whole shape: no fuzzed value is one
            legal = key != "model_shape" and leaf_value_is_legal(key, meta, tp, _parse(text))
            argv = ["run", config, "--out", "{tmp}/out"]
            for item in base + [f"{key}={text}"]:
                argv += ["--set", item]
            cases.append(Case(f"leaf {config}", argv, not legal, f"{key}={label}"))
    return cases


# ---------------------------------------------------------------- files and arguments

def make_fixtures(d: Path) -> dict:
    """Bad and good input files under `d`; returns name -> path."""
    import pandas as pd

    from sim.trace import read_trace, write_trace
    f = {}
    f["missing"] = d / "nope.yaml"
    f["dir"] = d / "adir"
    f["dir"].mkdir()
    f["nonutf8"] = d / "latin1.yaml"
    f["nonutf8"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    f["binary"] = d / "blob.yaml"
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["empty"] = d / "empty.yaml"
    f["empty"].write_bytes(b"")
    f["parquet"] = ROOT / "traces/sharegpt_small.parquet"
    raw = f["parquet"].read_bytes()
    f["truncated_parquet"] = d / "trunc.parquet"
    f["truncated_parquet"].write_bytes(raw[: len(raw) // 2])
    f["garbage_parquet"] = d / "garbage.parquet"
    f["garbage_parquet"].write_bytes(b"PAR1" + b"\xff" * 64 + b"PAR1")
    f["huge_claim_jsonl"] = d / "huge.jsonl"
    f["huge_claim_jsonl"].write_text('{"session_id": "a", "turn": 0, "arrival_s": 0, "prompt_tokens": '
                                     '18446744073709551616, "output_tokens": 1e308}\n')
    f["yaml_list"] = d / "list.yaml"
    f["yaml_list"].write_text("- 1\n- 2\n")
    f["deep_yaml"] = d / "deep.yaml"
    f["deep_yaml"].write_text("[" * 5000)
    f["afile"] = d / "afile"
    f["afile"].write_text("x\n")
    # run_case writes it in each case's own folder; as --png/--json/--save-spec it is bad too: a name
    # with no extension is refused (expected .png, .json, .yaml), not written as a PNG named 'afile'
    f["out_file"] = "{tmp}/afile"
    f["under_file"] = "{tmp}/afile/out"
    f["proc"] = Path("/proc/version/out")
    full = read_trace(f["parquet"])
    tiny = full[full["session_id"].isin(full["session_id"].unique()[:3])]
    f["tiny_trace"] = d / "tiny.parquet"
    write_trace(tiny, f["tiny_trace"])
    f["tiny_trace_jsonl"] = d / "tiny.jsonl"
    write_trace(tiny, f["tiny_trace_jsonl"])
    f["tiny_config"] = d / "tiny.yaml"
    f["tiny_config"].write_text(f"name: tiny\nworkload:\n  trace: {f['tiny_trace']}\nssd:\n  bytes: 0\n")
    f["tiny_spec"] = d / "spec.yaml"
    f["tiny_spec"].write_text(f"name: tinyspec\nbase: {f['tiny_config']}\ngrid:\n  policy.kind: [recompute]\n")
    f["mooncake"] = d / "mooncake.jsonl"
    f["mooncake"].write_text('{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [1, 2]}\n'
                             '{"timestamp": 5, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]}\n')
    f["sharegpt"] = d / "sharegpt.json"
    f["sharegpt"].write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi there"}, '
                             '{"from": "gpt", "value": "hello, how can I help"}]}]')
    f["bad_points"] = d / "badsweep"
    f["bad_points"].mkdir()
    (f["bad_points"] / "points.parquet").write_bytes(b"\x00garbage")
    f["empty_points"] = d / "emptysweep"
    f["empty_points"].mkdir()
    pd.DataFrame({"point": []}).to_parquet(f["empty_points"] / "points.parquet")
    return f


NUMBERS_BAD = ["nan", "inf", "-inf", "-1", "1e308", "18446744073709551616", "", "abc", "1e400", "-0"]


def arg_cases(f: dict) -> list[Case]:
    """Every argument of run, sweep, plan, trace *, report, plot, config keys with bad values."""
    C = []
    s = str
    bad_inputs = ["missing", "dir", "nonutf8", "binary", "empty", "parquet", "truncated_parquet",
                  "garbage_parquet", "yaml_list", "deep_yaml", "afile"]
    bad_outs = ["out_file", "under_file", "proc"]
    tiny, tcfg = ["--set", TINY], s(f["tiny_config"])

    # run
    for k in bad_inputs:
        C.append(Case("run", ["run", s(f[k]), "--out", "{tmp}/out"], True, f"config={k}"))
    C.append(Case("run", [b"run", b"\xff\xfe.yaml", b"--out", b"{tmp}/out"], True, "config=non-UTF-8 argv"))
    C.append(Case("run", ["run", "", "--out", "{tmp}/out"], True, "config=''"))
    for k in bad_outs:
        C.append(Case("run", ["run", tcfg, "--out", s(f[k])], True, f"--out={k}"))
    C.append(Case("run", ["run", tcfg, "--out", ""], True, "--out=''"))
    C.append(Case("run", ["run", tcfg, "--out", "{tmp}/" + "x" * 300], True, "--out=name too long"))
    C.append(Case("run", [b"run", tcfg.encode(), b"--out", b"{tmp}/\xff"], True, "--out=non-UTF-8 name"))
    for item in ["x", "=", "==", "=1", "seed", "a.b.c.d=1", "seed=1=2", ".seed=1", "seed.=1", "seed..x=1",
                 "host.dram_bytes.x=1", "policy.kind.x=1", "seed= 1", " seed=1", "seed=!!python/object:os.system",
                 "seed=*a", "seed=" + "[" * 3000, "seed=" + "9" * 5000]:
        C.append(Case("run", ["run", tcfg, "--out", "{tmp}/out", "--set", item], item not in ("seed= 1", " seed=1"),
                      f"--set {item[:40]!r}"))
    C.append(Case("run", [b"run", tcfg.encode(), b"--out", b"{tmp}/out", b"--set", b"name=\xff"], True,
                  "--set non-UTF-8 value"))
    C.append(Case("run", [b"run", tcfg.encode(), b"--out", b"{tmp}/out", b"--set", b"\xff=1"], True,
                  "--set non-UTF-8 key"))
    for comp in ["", ",", "bogus", "nan", "recompute,", "recompute,,attentionstore", " recompute ", "RECOMPUTE",
                 "recompute,recompute"]:
        legal = comp in (" recompute ",)
        C.append(Case("run", ["run", tcfg, "--out", "{tmp}/out", "--compare", comp], not legal,
                      f"--compare {comp!r}"))
    C.append(Case("run", ["run", tcfg, "--out", "{tmp}/out", "--bogus"], True, "unknown option"))
    C.append(Case("run", ["run"], True, "no config"))
    C.append(Case("run", ["run", tcfg, "--set", "hardware_profile=" + s(f["binary"]), "--out", "{tmp}/out"],
                  True, "hardware_profile=binary"))
    C.append(Case("run", ["run", tcfg, "--set", "hardware_profile=" + s(f["nonutf8"]), "--out", "{tmp}/out"],
                  True, "hardware_profile=nonutf8"))
    C.append(Case("run", ["run", tcfg, "--set", "hardware_profile=" + s(f["empty"]), "--out", "{tmp}/out"],
                  True, "hardware_profile=empty"))
    C.append(Case("run", ["run", tcfg, "--set", "hardware_profile=" + s(f["parquet"]), "--out", "{tmp}/out"],
                  True, "hardware_profile=parquet"))
    C.append(Case("run", ["run", tcfg, "--set", "hardware_profile=configs/hardware/h100.yaml", "--out",
                          "{tmp}/out"], False, "hardware_profile=h100.yaml"))
    for k in ["nonutf8", "binary", "empty", "truncated_parquet", "garbage_parquet", "huge_claim_jsonl", "afile",
              "deep_yaml"]:
        C.append(Case("run", ["run", tcfg, "--set", f"workload.trace={f[k]}", "--out", "{tmp}/out"], True,
                      f"workload.trace={k}"))
    C.append(Case("run", ["run", tcfg, "--set", f"workload.trace={f['tiny_trace_jsonl']}", "--out", "{tmp}/out"],
                  False, "workload.trace=tiny jsonl"))

    # sweep
    for k in bad_inputs + ["tiny_config"]:
        C.append(Case("sweep", ["sweep", s(f[k]), "--out", "{tmp}/sw", "--no-progress", "-j", "1"], True,
                      f"spec={k}"))
    spec = s(f["tiny_spec"])
    for j in ["0", "-1", "nan", "1e308", "18446744073709551616", "", "abc"]:
        C.append(Case("sweep", ["sweep", spec, "--out", "{tmp}/sw", "--no-progress", "-j", j], True, f"--jobs {j}"))
    for k in bad_outs:
        C.append(Case("sweep", ["sweep", spec, "--out", s(f[k]), "--no-progress", "-j", "1"], True, f"--out={k}"))
    for ray in ["", "bogus", "ray://nowhere:1"]:
        C.append(Case("sweep", ["sweep", spec, "--out", "{tmp}/sw", "--no-progress", "--ray", ray], True,
                      f"--ray {ray!r}"))
    C.append(Case("sweep", ["sweep", spec, "--out", "{tmp}/sw", "--no-progress", "-j", "1"], False, "tiny spec"))
    C.append(Case("sweep", ["sweep", s(f["dir"]), "--no-progress"], True, "an empty folder of specs"))

    # plan (a tiny config and a 2-point ladder unless the ladder itself is fuzzed)
    small = ["--dram-max", "16GB", "--ssd", "0"]
    plan = ["plan", "--config", tcfg, "--slo", "ttft_p99_ms<=100000", "-j", "1"]
    for k in bad_inputs:
        C.append(Case("plan", ["plan", "--config", s(f[k]), "--slo", "ttft_p99_ms<=1", "-j", "1", *small], True,
                      f"--config={k}"))
    for slo in ["", "nan", "ttft_p99_ms<=nan", "ttft_p99_ms<=inf", "ttft_p99_ms<=-1", "ttft_p99_ms<=1e308",
                "bogus<=1", "ttft_p99_ms", "<=5", "ttft_p99_ms<=1e400", "ttft_p99_ms==1", "ttft_p99_ms<=abc"]:
        C.append(Case("plan", ["plan", "--config", tcfg, "--slo", slo, "-j", "1", *small], True, f"--slo {slo!r}"))
    for rate in NUMBERS_BAD + ["0"]:
        C.append(Case("plan", [*plan, *small, "--rate", rate], True, f"--rate {rate!r}"))
    for g in ["", "0", "-1", "nan", "99999", "1,,2", "1e308", "18446744073709551616", "abc"]:
        C.append(Case("plan", [*plan, *small, "--gpus", g], True, f"--gpus {g!r}"))
    legal_ladder = {"--dram-min": {"0", "-0", "1"}, "--dram-max": {"0", "-0", "1"}, "--dram-step": set(),
                    "--ssd-max": {"0", "-0", "1"}}  # a 1-byte or 1e-300 step is 16e9+ simulations: not legal
    for opt, legal in legal_ladder.items():
        fixed = {"--dram-max": "16GB", "--ssd": "0"}
        fixed.pop(opt, None)
        if opt == "--ssd-max":
            fixed.pop("--ssd")  # --ssd replaces the ladder --ssd-max spans
        for v in NUMBERS_BAD + ["0", "1", "1e-300", "20PB"]:
            argv = [*plan, *(x for kv in fixed.items() for x in kv), opt, v]
            C.append(Case("plan", argv, v not in legal, f"{opt} {v!r}"))
    for v in ["", ",", "nan", "-1", "1e308", "0,nan", "abc", "1e400", "20PB"]:
        C.append(Case("plan", [*plan, "--dram-max", "16GB", "--ssd", v], True, f"--ssd {v!r}"))
    for v in ["", "bogus", "nan", "ttft_p99_ms"]:
        C.append(Case("plan", [*plan, *small, "--cost", v], v != "ttft_p99_ms", f"--cost {v!r}"))
    for v in ["0", "-1", "nan", "1e308", "18446744073709551616"]:  # 0 simulations at once is no plan: refused
        C.append(Case("plan", ["plan", "--config", tcfg, "--slo", "ttft_p99_ms<=100000", *small, "-j", v],
                      True, f"--jobs {v!r}"))
    for item in ["x", "seed=-1", "ssd.read_gbps=.nan", "host.dram_bytes=1GB"]:
        C.append(Case("plan", [*plan, *small, "--set", item], True, f"--set {item!r} (plan owns dram)"))
    for k in bad_outs:
        C.append(Case("plan", [*plan, *small, "--out", s(f[k])], True, f"--out={k}"))
    C.append(Case("plan", [*plan, *small, "--out", "{tmp}/plan"], False, "tiny plan"))

    # trace sharegpt (the chars tokenizer: no model download)
    sg = ["trace", "sharegpt", "--tokenizer", "chars", "--no-cache"]
    for k in bad_inputs + ["huge_claim_jsonl", "mooncake"]:
        C.append(Case("trace", [*sg, "--input", s(f[k]), "--out", "{tmp}/t.parquet"], True, f"sharegpt --input={k}"))
    good_sg = [*sg, "--input", s(f["sharegpt"])]
    for k in bad_outs:
        C.append(Case("trace", [*good_sg, "--out", s(f[k])], True, f"sharegpt --out={k}"))
    for ext in ["t.txt", "t", "t.yaml"]:
        C.append(Case("trace", [*good_sg, "--out", "{tmp}/" + ext], True, f"sharegpt --out={ext}"))
    for opt in ["--sample", "--seed", "--session-rate", "--think-mean"]:
        for v in NUMBERS_BAD + ["0"]:
            legal = opt in ("--seed", "--think-mean") and v in ("0", "-0")
            C.append(Case("trace", [*good_sg, "--out", "{tmp}/t.parquet", opt, v], not legal,
                          f"sharegpt {opt} {v!r}"))
    for k in ["out_file", "under_file", "proc"]:
        C.append(Case("trace", [*sg, "--input", s(f["sharegpt"]), "--out", "{tmp}/t.parquet", "--cache-dir",
                                s(f[k])], False, f"sharegpt --cache-dir={k} (with --no-cache: unused)"))
        C.append(Case("trace", ["trace", "sharegpt", "--tokenizer", "chars", "--input", s(f["sharegpt"]), "--out",
                                "{tmp}/t.parquet", "--cache-dir", s(f[k])], True, f"sharegpt cache --cache-dir={k}"))
        C.append(Case("trace", [*good_sg, "--out", "{tmp}/t.parquet", "--png", s(f[k])], True,
                      f"sharegpt --png={k}"))
    C.append(Case("trace", [*good_sg, "--out", "{tmp}/t.parquet"], False, "sharegpt tiny"))

    # trace mooncake
    for k in bad_inputs + ["huge_claim_jsonl", "sharegpt"]:
        C.append(Case("trace", ["trace", "mooncake", s(f[k]), "--out", "{tmp}/t.parquet"], True, f"mooncake input={k}"))
        C.append(Case("trace", ["trace", "mooncake", s(f[k]), "--out", "{tmp}/t.parquet", "--strict"], True,
                      f"mooncake --strict input={k}"))
    mc = ["trace", "mooncake", s(f["mooncake"])]
    for k in bad_outs:
        C.append(Case("trace", [*mc, "--out", s(f[k])], True, f"mooncake --out={k}"))
        C.append(Case("trace", [*mc, "--out", "{tmp}/t.parquet", "--png", s(f[k])], True, f"mooncake --png={k}"))
    for v in NUMBERS_BAD + ["0", "18446744073709551616"]:
        C.append(Case("trace", [*mc, "--out", "{tmp}/t.parquet", "--sessions", "--min-blocks", v], True,
                      f"mooncake --min-blocks {v!r}"))
    C.append(Case("trace", [*mc, "--out", "{tmp}/t.parquet", "--sessions"], False, "mooncake tiny"))

    # trace synth
    sy = ["trace", "synth", "--sessions", "3"]
    for k in bad_inputs:
        C.append(Case("trace", [*sy, "--spec", s(f[k]), "--out", "{tmp}/t.parquet"], True, f"synth --spec={k}"))
        C.append(Case("trace", [*sy, "--fit", s(f[k]), "--out", "{tmp}/t.parquet"], k != "parquet",
                      f"synth --fit={k}"))
    for k in bad_outs:
        C.append(Case("trace", [*sy, "--out", s(f[k])], True, f"synth --out={k}"))
        C.append(Case("trace", [*sy, "--save-spec", s(f[k])], True, f"synth --save-spec={k}"))
        C.append(Case("trace", [*sy, "--out", "{tmp}/t.parquet", "--png", s(f[k])], True, f"synth --png={k}"))
    for opt in ["--sessions", "--rate", "--think-mean", "--prompt-scale", "--output-scale", "--seed"]:
        for v in NUMBERS_BAD + ["0", "1e-300"]:
            legal = opt in ("--seed", "--think-mean") and v in ("0", "-0")
            argv = ["trace", "synth", "--out", "{tmp}/t.parquet", opt, v]
            if opt != "--sessions":
                argv += ["--sessions", "3"]
            C.append(Case("trace", argv, not legal, f"synth {opt} {v!r}"))
    C.append(Case("trace", [*sy, "--out", "{tmp}/t.parquet"], False, "synth tiny"))
    C.append(Case("trace", [*sy, "--fit", s(f["tiny_trace"]), "--out", "{tmp}/t.parquet"], False, "synth --fit tiny"))

    # trace stats
    for k in bad_inputs + ["huge_claim_jsonl", "mooncake"]:
        C.append(Case("trace", ["trace", "stats", s(f[k]), "--png", "{tmp}/s.png"], k != "parquet",
                      f"stats file={k}"))
    for k in bad_outs:
        C.append(Case("trace", ["trace", "stats", s(f["tiny_trace"]), "--png", s(f[k])], True, f"stats --png={k}"))
        C.append(Case("trace", ["trace", "stats", s(f["tiny_trace"]), "--png", "{tmp}/s.png", "--json", s(f[k])],
                      True, f"stats --json={k}"))
    C.append(Case("trace", ["trace", "stats", s(f["tiny_trace"]), "--png", "{tmp}/s.png", "--json", ""], True,
                  "stats --json ''"))
    C.append(Case("trace", ["trace", "stats", s(f["tiny_trace"]), "--png", "{tmp}/s.png"], False, "stats tiny"))

    # report, plot, config keys
    for k in ["missing", "afile", "empty", "binary", "dir", "bad_points", "empty_points"]:
        C.append(Case("report", ["report", s(f[k]), "--no-plot"], True, f"report results={k}"))
        C.append(Case("plot", ["plot", s(f[k])], True, f"plot results={k}"))
    for fmt in ["", "bogus", "TEXT"]:
        C.append(Case("config", ["config", "keys", "--format", fmt], True, f"config keys --format {fmt!r}"))
    C.append(Case("config", ["config", "keys", "--format", "markdown"], False, "config keys markdown"))
    C.append(Case("config", ["config", "bogus"], True, "config bogus"))
    C.append(Case("cli", [], True, "no command"))
    C.append(Case("cli", ["bogus"], True, "unknown command"))
    return C


# ---------------------------------------------------------------- running

def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_case(case: Case, timeout: float) -> tuple[str, str, float]:
    """(class, detail, seconds) of one case."""
    tmp = Path(tempfile.mkdtemp(prefix="kvsim-fuzz-"))
    (tmp / "afile").write_text("x\n")
    argv = [a.replace(b"{tmp}", str(tmp).encode()) if isinstance(a, bytes) else a.replace("{tmp}", str(tmp))
            for a in case.argv]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "sim.cli", *argv], cwd=ROOT, capture_output=True, timeout=timeout,
                           env=env, preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hang", f"no answer in {timeout:g} s", time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    err = p.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1][:300] if lines else ""
    if "Traceback" in err or p.returncode not in (0, 1, 2):
        return "traceback", f"exit {p.returncode}: {last}", dt
    if p.returncode == 2:
        if len(lines) == 1:
            return ("clean" if case.bad else "refused"), last, dt
        return "messy", f"{len(lines)} stderr lines: " + " | ".join(ln[:120] for ln in lines[:4]), dt
    out = p.stdout.decode("utf-8", "replace").strip().splitlines()
    detail = f"exit {p.returncode}: " + (last or (out[-1][:200] if out else ""))
    return ("silent" if case.bad else "accepted"), detail, dt


def command_line(case: Case) -> str:
    parts = ["python", "-m", "sim.cli"]
    for a in case.argv:
        parts.append(shlex.quote(a) if isinstance(a, str) else "$'" + "".join(
            chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in a) + "'")
    return " ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--sample", type=float, default=None,
                    help="fraction of leaf cases of configs other than default.yaml to run (default 0.25; "
                         "default.yaml and every argument case always run)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--only", choices=("leaves", "args"), help="run one part")
    ap.add_argument("--show", default=",".join(BAD_CLASSES), help="classes whose cases are listed")
    args = ap.parse_args(argv)

    fixtures_dir = Path(tempfile.mkdtemp(prefix="kvsim-fuzz-fixtures-"))
    try:
        f = make_fixtures(fixtures_dir)
        cases = []
        if args.only != "args":
            rng = random.Random(args.seed)
            frac = 0.25 if args.sample is None else args.sample
            for i, cfg in enumerate(CONFIGS):
                lc = leaf_cases(cfg, str(f["tiny_trace"]))
                cases += lc if i == 0 else [c for c in lc if rng.random() < frac]
        if args.only != "leaves":
            cases += arg_cases(f)
        print(f"{len(cases)} cases, {args.jobs} at a time, {args.timeout:g} s timeout each", flush=True)
        t0 = time.perf_counter()
        done = [0]

        def one(case):
            res = run_case(case, args.timeout)
            done[0] += 1
            if done[0] % 100 == 0:
                print(f"  {done[0]} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            return res
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, cases))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(fixtures_dir, ignore_errors=True)

    counts = {k: 0 for k in ("clean", "accepted", *BAD_CLASSES)}
    by_group: dict = {}
    for case, (cls, _, _) in zip(cases, results):
        counts[cls] += 1
        g = by_group.setdefault(case.group, dict.fromkeys(counts, 0))
        g[cls] += 1
    print(f"\n{len(cases)} cases in {wall:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for g, c in by_group.items():
        print(f"  {g:32s} " + ", ".join(f"{k} {v}" for k, v in c.items() if v))
    show = set(args.show.split(","))
    for cls in counts:
        if cls not in show:
            continue
        hits = [(c, r) for c, r in zip(cases, results) if r[0] == cls]
        if hits:
            print(f"\n== {cls} ({len(hits)})")
        for c, (_, detail, dt) in hits:
            print(f"- [{c.group}] {c.what} ({dt:.1f} s): {detail}\n    {command_line(c)}")
    return 1 if any(counts[k] for k in ("traceback", "hang", "silent")) else 0


if __name__ == "__main__":
    sys.exit(main())
