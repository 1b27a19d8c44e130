"""Parameter sweeps: a YAML spec expands into points (one resolved config each) that run in parallel.

A sweep spec (documented in configs/sweeps/README.md) is a base config plus axes:

    name: dram_ssd                 # output goes to results/<name>/
    base: ../default.yaml          # relative to the spec file
    overrides: {workload.max_sessions: 200}
    variants:  {full: {}, no_preload: {policy.layerwise_preload: false}}   # named override sets
    grid:      {host.dram_bytes: [32GB, 128GB], policy.kind: [recompute, attentionstore]}
    zip:       {gpu.count: [1, 2], host.dram_bytes: [...]}                  # lists of one length
    seeds:     [0, 1]

Points = variants x grid (cartesian) x zip (walked together) x seeds, at most MAX_POINTS of them.
Every point is resolved and validated against the config schema before any runs: a bad axis value
is an error naming the spec file and the key, not a column of failed points.  Several seeds are
accepted only where the seed redraws something (`seed_redraws`), so replications are never copies.

Each point is keyed by a hash of its *resolved* config, so resuming a sweep skips every point whose
result is already on disk, a changed spec reuses the points it still shares with the old one, and
two spellings of one config ("128GB" and 128e9) run once.  Files a config names (trace, hardware
profile) enter the key by their content, not their path, so a key is the same in every checkout.
A point's files land in results/<name>/points/<key>/ and its point.json is written last: its
presence is the commit mark that resume trusts.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from sim.errors import KvsimError, read_yaml
from sim.files import atomic_write_parquet, atomic_write_text, check_out_dir

POINTS_FILE = "points.parquet"
SPEC_KEYS = {"name", "base", "overrides", "variants", "grid", "zip", "seeds", "description", "out"}
# Resolved config values copied into every row of points.parquet, axis or not, so plots and
# reports can always place a point (x = DRAM per GPU, series = policy, ...).
DESCRIPTOR_KEYS = (
    "seed", "model", "gpu.name", "gpu.count", "host.dram_bytes", "ssd.bytes",
    "workload.session_rate_per_s", "policy.kind", "policy.eviction", "policy.layerwise_preload",
    "policy.async_save", "policy.scheduler_aware_fetch", "policy.truncation",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
# Every point is resolved and validated up front (a few ms each) and kept in memory with its config,
# so a spec is refused past this many points: split a larger study into several specs.
MAX_POINTS = 10_000
# Config keys that name files: a point's key hashes their content, so it does not depend on where
# the checkout lives (and a trace edited in place does not reuse results of the old one).
FILE_KEYS = ("workload.trace", "hardware_profile")


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep spec; `base` is an absolute path."""
    name: str
    path: Path
    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zipped: dict[str, list[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    description: str = ""
    out: Path | None = None

    @property
    def axes(self) -> list[str]:
        """The dotted keys that vary across points, in spec order (seed and variant are separate)."""
        return list(self.grid) + [k for k in self.zipped if k not in self.grid]


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep before resolution: its position, the values that made it, its overrides."""
    index: int
    variant: str | None
    params: tuple[tuple[str, Any], ...]
    seed: int | None
    overrides: dict[str, Any]


@dataclass(frozen=True)
class ResolvedPoint:
    """A point with its resolved, validated config and its key."""
    point: SweepPoint
    key: str
    config: dict[str, Any]


@dataclass(frozen=True)
class SweepOutcome:
    """What one `run_sweep` call did; `table` is the content of points.parquet."""
    out_dir: Path
    total: int
    ran: int
    skipped: int
    failed: int
    wall_s: float
    table: pd.DataFrame


# ---------------------------------------------------------------- spec parsing and point expansion

def load_sweep_spec(path) -> SweepSpec:
    """Read and validate a sweep spec; every problem raises KvsimError naming file and key."""
    path = Path(path)
    return parse_sweep_spec(read_yaml(path, "sweep spec"), path)


def parse_sweep_spec(raw: Any, path: Path) -> SweepSpec:
    if not isinstance(raw, dict):
        raise KvsimError(f"{path}: expected a mapping with keys name, base, grid/zip/variants, seeds")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise KvsimError(f"{path}: {unknown[0]}: unknown key; expected one of {sorted(SPEC_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise KvsimError(f"{path}: name: expected a string of letters, digits, '_', '-', '.' (and '/' for "
                         f"nested results), got {name!r}")
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise KvsimError(f"{path}: base: expected the path of a config YAML, relative to the spec")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise KvsimError(f"{path}: base: config {base_path} not found")
    overrides = _mapping(raw.get("overrides"), path, "overrides")
    grid = {k: _values(v, path, f"grid.{k}") for k, v in _mapping(raw.get("grid"), path, "grid").items()}
    zipped = {k: _values(v, path, f"zip.{k}") for k, v in _mapping(raw.get("zip"), path, "zip").items()}
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise KvsimError(f"{path}: zip: expected lists of one length, got lengths "
                         f"{ {k: len(v) for k, v in zipped.items()} }")
    both = sorted(set(grid) & set(zipped))
    if both:
        raise KvsimError(f"{path}: zip.{both[0]}: key is also a grid axis; put it in one of them")
    variants: dict[str, dict[str, Any]] = {}
    for label, ov in _mapping(raw.get("variants"), path, "variants").items():
        ov = _mapping(ov, path, f"variants.{label}")
        clash = sorted(set(ov) & (set(grid) | set(zipped)))
        if clash:
            raise KvsimError(f"{path}: variants.{label}.{clash[0]}: key is also a grid/zip axis")
        variants[str(label)] = ov
    seeds_raw = raw.get("seeds")
    if seeds_raw is None:
        seeds: tuple[int, ...] = ()
    elif isinstance(seeds_raw, list) and seeds_raw and all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds_raw):
        seeds = tuple(seeds_raw)
    else:
        raise KvsimError(f"{path}: seeds: expected a non-empty list of integers, got {seeds_raw!r}")
    if seeds and ("seed" in grid or "seed" in zipped or "seed" in overrides):
        raise KvsimError(f"{path}: seeds: seed is also set by grid/zip/overrides; set it in one place")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise KvsimError(f"{path}: seeds: seed {dup[0]} is listed twice; expected distinct seeds")
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise KvsimError(f"{path}: out: expected a directory path")
    spec = SweepSpec(name=name, path=path, base=base_path, overrides=overrides, variants=variants, grid=grid,
                     zipped=zipped, seeds=seeds, description=str(raw.get("description") or ""),
                     out=Path(out) if out else None)
    n = count_points(spec)
    if n > MAX_POINTS:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in ((("variants", spec.variants), *spec.grid.items(),
                                                           *(list(spec.zipped.items())[:1]), ("seeds", spec.seeds)))
                          if len(v) > 0)
        raise KvsimError(f"{path}: grid: {n:,} points ({sizes}); expected at most {MAX_POINTS:,} per spec: "
                         f"split the study into several specs")
    return spec


def count_points(spec: SweepSpec) -> int:
    """variants x grid x zip x seeds, counted without expanding them."""
    n = max(1, len(spec.variants)) * max(1, len(spec.seeds))
    for values in spec.grid.values():
        n *= len(values)
    if spec.zipped:
        n *= len(next(iter(spec.zipped.values())))
    return n


def _mapping(value: Any, path: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise KvsimError(f"{path}: {key}: expected a mapping from dotted config keys to values")
    return dict(value)


def _values(value: Any, path: Path, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise KvsimError(f"{path}: {key}: expected a non-empty list of values")
    return list(value)


def expand_points(spec: SweepSpec) -> list[SweepPoint]:
    """variants x grid x zip x seeds, in that nesting order, numbered from 0."""
    if count_points(spec) > MAX_POINTS:
        raise KvsimError(f"{spec.path}: {count_points(spec):,} points; expected at most {MAX_POINTS:,} per spec")
    variants = list(spec.variants.items()) or [(None, {})]
    grid_keys = list(spec.grid)
    grid_combos = list(itertools.product(*(spec.grid[k] for k in grid_keys))) if grid_keys else [()]
    zip_keys = list(spec.zipped)
    zip_rows = list(zip(*(spec.zipped[k] for k in zip_keys))) if zip_keys else [()]
    seeds = list(spec.seeds) or [None]
    points = []
    for (label, variant_ov), combo, zrow, seed in itertools.product(variants, grid_combos, zip_rows, seeds):
        params = tuple(zip(grid_keys, combo)) + tuple(zip(zip_keys, zrow))
        overrides = {**spec.overrides, **variant_ov, **dict(params)}
        if seed is not None:
            overrides["seed"] = seed
        points.append(SweepPoint(index=len(points), variant=label, params=params, seed=seed, overrides=overrides))
    return points


def config_key(config: dict[str, Any]) -> str:
    """Stable key of a resolved config: the first 16 hex digits of sha256 over canonical JSON, with
    each file the config names (FILE_KEYS) replaced by the digest of its content."""
    keyed = config
    for dotted in FILE_KEYS:
        value = get_dotted(config, dotted)
        if isinstance(value, str):
            keyed = _with_dotted(keyed, dotted, "sha256:" + file_digest(value))
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a sweep reads each file once."""
    p = Path(path)
    try:
        st = p.stat()
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _DIGESTS:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _DIGESTS[memo] = h.hexdigest()
    except OSError as exc:
        raise KvsimError(f"{path}: cannot read the file to key the sweep point ({exc.strerror or exc})") from None
    return _DIGESTS[memo]


def _with_dotted(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with one dotted key replaced (the dicts along its path copied, the rest shared)."""
    head, _, rest = dotted.partition(".")
    out = dict(config)
    out[head] = _with_dotted(config[head], rest, value) if rest else value
    return out


def seed_redraws(config: dict[str, Any]) -> list[str]:
    """What the seed of a resolved config redraws (sim/workload.py draws from it and nothing else does):
    an empty list means every seed gives the same run."""
    wl = config.get("workload") or {}
    out = []
    if not wl.get("trace"):
        out.append("the synthetic trace")
    if wl.get("session_rate_per_s") is not None:
        out.append("Poisson session arrivals")
    if wl.get("think_time_mean_s") and wl.get("think_time_dist") != "fixed":
        out.append("think times")
    return out


def resolve_point(spec: SweepSpec, point: SweepPoint) -> ResolvedPoint:
    """Apply the point's overrides to the base config and validate it against the config schema; a
    bad value raises a KvsimError naming the spec file and the spec key that set it."""
    from sim.config import config_to_dict, load_config

    try:
        cfg = config_to_dict(load_config(spec.base, dict(point.overrides)))
    except KvsimError as exc:
        raise KvsimError(_blame(spec, point, str(exc))) from None
    return ResolvedPoint(point, config_key(cfg), cfg)


def resolve_points(spec: SweepSpec) -> list[ResolvedPoint]:
    """Every point of the spec, resolved and validated before any runs; refuses seeds that redraw nothing."""
    resolved = [resolve_point(spec, p) for p in expand_points(spec)]
    seeds = sorted({rp.point.overrides.get("seed") for rp in resolved} - {None})
    if len(seeds) > 1:
        for rp in resolved:
            if not seed_redraws(rp.config):
                where = "seeds" if spec.seeds else ("grid.seed" if "seed" in spec.grid else "zip.seed")
                params = ", ".join(f"{k}={v}" for k, v in rp.point.params) or "every point"
                raise KvsimError(
                    f"{spec.path}: {where}: {len(seeds)} seeds, but at {params} the seed redraws nothing (the trace's "
                    f"own arrivals and think times are replayed), so every seed would repeat the same run; set "
                    f"workload.session_rate_per_s (the seed then redraws Poisson session arrivals) or "
                    f"workload.think_time_mean_s, or give one seed")
    return resolved


def _blame(spec: SweepSpec, point: SweepPoint, message: str) -> str:
    """Rewrite a config error about the base file into one about the spec key that set the bad value."""
    prefix = f"{spec.base}: "
    detail = message[len(prefix):] if message.startswith(prefix) else message
    key = detail.split(":", 1)[0].strip()
    params = dict(point.params)
    variant = spec.variants.get(point.variant or "", {})
    for dotted in sorted(point.overrides, key=len, reverse=True):  # the most specific key that covers the error
        if key != dotted and not key.startswith(dotted + "."):
            continue
        if dotted in params:
            where = ("grid." if dotted in spec.grid else "zip.") + dotted
        elif dotted in variant:
            where = f"variants.{point.variant}.{dotted}"
        elif dotted == "seed" and point.seed is not None:
            where = "seeds"
        else:
            where = f"overrides.{dotted}"
        return f"{spec.path}: {where}: {detail[len(key) + 1:].strip()} (checked against {spec.base.name})"
    params = ", ".join(f"{k}={v!r}" for k, v in point.overrides.items())
    return f"{spec.path}: point {point.index} ({params or 'no overrides'}): {message}"


def get_dotted(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# ---------------------------------------------------------------- running one point

def simulate_config(config: dict[str, Any]):
    """Run the simulator on a resolved config dict; the default point runner (module level so that
    process pools and Ray can ship it by reference)."""
    from sim.config import load_config
    from sim.runner import run_simulation

    return run_simulation(load_config(config))


def execute_point(config: dict[str, Any], runner: Callable[[dict[str, Any]], Any] = simulate_config) -> dict:
    """Run one point and never raise: the outcome says ok (with the result) or error (with why).

    Runs inside a worker process (or Ray task); the driver writes the files, so that a Ray cluster
    without a shared filesystem still lands every result on the machine that asked for it.
    """
    t0 = time.perf_counter()
    try:
        result = runner(config)
        return {"status": "ok", "result": result, "wall_s": time.perf_counter() - t0}
    except KvsimError as exc:
        return {"status": "error", "error": str(exc), "traceback": traceback.format_exc(),
                "wall_s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - a crashing point is recorded, the sweep goes on
        return {"status": "error", "error": _one_line(exc), "traceback": traceback.format_exc(),
                "wall_s": time.perf_counter() - t0}


def _one_line(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}{where}"


# ---------------------------------------------------------------- files

def prepare_out_dir(path, what: str) -> Path:
    """Create the output folder `path` and prove it writable, before anything runs; a file in the way,
    a parent that is a file or a read-only folder is one KvsimError naming `what` (the flag or key)."""
    return check_out_dir(path, what, create=True)


def point_dir(out_dir: Path, key: str) -> Path:
    return out_dir / "points" / key


def read_point_record(out_dir: Path, key: str) -> dict | None:
    """The committed record of a point, or None when the point has not finished."""
    f = point_dir(out_dir, key) / "point.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # cannot happen with atomic writes, but a hand-edited file must not stop a resume


def commit_point(out_dir: Path, rp: ResolvedPoint, outcome: dict) -> dict:
    """Write a finished point's files, point.json last, and return its record."""
    pdir = point_dir(out_dir, rp.key)
    pdir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"key": rp.key, "status": outcome["status"], "error": outcome.get("error"),
                              "wall_s": round(float(outcome.get("wall_s", 0.0)), 4), "summary": {},
                              "overrides": _jsonable(rp.point.overrides), "config": rp.config,
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if outcome["status"] == "ok":
        from sim.runner import write_results

        result = outcome["result"]
        write_results(result, pdir)
        record["summary"] = _jsonable(dict(result.summary))
    else:
        record["traceback"] = outcome.get("traceback")
    atomic_write_text(pdir / "point.json", json.dumps(record, indent=1, sort_keys=True, default=str))
    return record


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars from pandas summaries
        return o.item()
    return str(o)


# ---------------------------------------------------------------- the table of points

def points_table(spec: SweepSpec, resolved: list[ResolvedPoint], records: dict[str, dict]) -> pd.DataFrame:
    """One row per point of the spec: its axes (resolved values), descriptors, status and summary."""
    rows = []
    for rp in resolved:
        rec = records.get(rp.key)
        row: dict[str, Any] = {"sweep": spec.name, "point": rp.point.index, "key": rp.key,
                               "variant": rp.point.variant}
        for key, value in rp.point.params:
            row[key] = get_dotted(rp.config, key, value)
        for key in DESCRIPTOR_KEYS:
            if key not in row:
                row[key] = get_dotted(rp.config, key)
        if rec is None:
            row.update(status="pending", error=None, wall_s=None)
        else:
            row.update(status=rec["status"], error=rec.get("error"), wall_s=rec.get("wall_s"))
            for k, v in (rec.get("summary") or {}).items():
                if k not in row:  # the summary repeats e.g. `model`; the config's value is already there
                    row[k] = v
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Give every object column one type that parquet can hold: numbers stay numbers, the rest strings."""
    for col in df.columns:
        if df[col].dtype != object:
            continue
        vals = df[col].dropna()
        if len(vals) and all(isinstance(v, bool) for v in vals):
            continue
        if len(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            df[col] = pd.to_numeric(df[col])
        else:
            df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    return df


def read_points(path) -> pd.DataFrame:
    """Load a sweep's points.parquet (from its directory or the file itself)."""
    path = Path(path)
    f = path / POINTS_FILE if path.is_dir() else path
    if not f.is_file():
        raise KvsimError(f"{path}: no {POINTS_FILE} found; run `kvsim sweep <spec>` first")
    try:
        return pd.read_parquet(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise KvsimError(f"{f}: not a readable points table ({type(exc).__name__}); rerun `kvsim sweep`") from None


# ---------------------------------------------------------------- the sweep driver

def default_out_dir(spec: SweepSpec) -> Path:
    return spec.out if spec.out is not None else Path("results") / spec.name


def run_sweep(spec: SweepSpec, out_dir: Path | None = None, jobs: int | None = None, ray_address: str | None = None,
              retry_failed: bool = False, force: bool = False, progress: bool = True,
              runner: Callable[[dict[str, Any]], Any] = simulate_config) -> SweepOutcome:
    """Run every point of `spec` not already finished under `out_dir`; returns what happened.

    Finished points (ok, or error unless `retry_failed`) are skipped; `force` reruns everything.
    Points run in `jobs` worker processes (1: in this process), or as Ray tasks on `ray_address`.
    """
    t0 = time.perf_counter()
    resolved = resolve_points(spec)  # every point validated before anything is written or run
    out_dir = prepare_out_dir(out_dir if out_dir is not None else default_out_dir(spec), "output folder")
    records: dict[str, dict] = {}
    todo: dict[str, ResolvedPoint] = {}  # by key: points that resolve to one config run once
    for rp in resolved:
        if rp.key in todo or rp.key in records:
            continue
        rec = None if force else read_point_record(out_dir, rp.key)
        if rec is not None and (rec["status"] == "ok" or not retry_failed):
            records[rp.key] = rec
        else:
            todo[rp.key] = rp
    _write_manifest(spec, out_dir)
    skipped = len(records)
    writer = _TableWriter(spec, resolved, records, out_dir)
    writer.flush()
    failed_now = 0
    bar = _progress(len(todo), spec.name, progress)
    try:
        for key, outcome in _execute_all(list(todo.values()), jobs, ray_address, runner):
            rec = commit_point(out_dir, todo[key], outcome)
            records[key] = rec
            failed_now += rec["status"] != "ok"
            bar.update(1)
            if failed_now:
                bar.set_postfix(failed=failed_now)
            writer.maybe_flush()
    finally:
        bar.close()
        table = writer.flush()
    failed = int((table["status"] == "error").sum())
    outcome = SweepOutcome(out_dir=out_dir, total=len(resolved), ran=len(todo), skipped=skipped, failed=failed,
                           wall_s=time.perf_counter() - t0, table=table)
    _log_run(out_dir, outcome, jobs, ray_address)
    return outcome


def code_version() -> str:
    """The git commit of the simulator that ran (with '+dirty' for uncommitted changes under sim/), or
    'unknown' outside a checkout: results are keyed by config only, so this is how a reader tells
    which simulator produced them."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


RUN_LOG = "runs.jsonl"


def read_run_log(out_dir: Path, repair: bool = False) -> list[dict]:
    """The records of runs.jsonl. A line that is not a JSON object (a copy cut short, a hand edit) is a
    KvsimError naming the file and line, or, with `repair`, dropped: the log is bookkeeping, the points
    are the results."""
    log = Path(out_dir) / RUN_LOG
    if not log.is_file():
        return []
    try:
        lines = log.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        if repair:
            return []
        raise KvsimError(f"{log}: cannot read the run log ({exc})") from None
    runs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("wall_s"), (int, float)):
            runs.append(rec)
        elif not repair:
            raise KvsimError(f"{log}: line {n}: expected one JSON record per line with wall_s, got {line[:40]!r}; "
                             f"a resumed `kvsim sweep` drops unreadable lines")
    return runs


def _log_run(out_dir: Path, o: SweepOutcome, jobs: int | None, ray_address: str | None) -> None:
    """One line per invocation in runs.jsonl: how long the sweep took, where, and how much it reran.
    The log is rewritten whole (atomically), keeping only the readable records of the old one."""
    line = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(o.wall_s, 3),
            "total": o.total, "ran": o.ran, "skipped": o.skipped, "failed": o.failed,
            "backend": f"ray:{ray_address}" if ray_address else "processes",
            "jobs": jobs or os.cpu_count(), "cpu_count": os.cpu_count(), "code": code_version()}
    runs = read_run_log(out_dir, repair=True) + [line]
    atomic_write_text(out_dir / RUN_LOG, "".join(json.dumps(r) + "\n" for r in runs))


def _shown(path: Path) -> str:
    """A path as the manifest records it: relative to the current directory when inside it, so a
    committed sweep.json does not carry the checkout's location."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _write_manifest(spec: SweepSpec, out_dir: Path) -> None:
    """Record what produced the directory, for the plots and the report to cite."""
    manifest = {"name": spec.name, "spec": _shown(spec.path), "base": _shown(spec.base), "description": spec.description,
                "axes": spec.axes, "variants": list(spec.variants), "seeds": list(spec.seeds),
                "overrides": _jsonable(spec.overrides)}
    atomic_write_text(out_dir / "sweep.json", json.dumps(manifest, indent=1))


class _TableWriter:
    """Rewrites points.parquet (and .csv) as points finish, at most every few seconds, so that an
    interrupted sweep still leaves a readable table; the per-point files are the ground truth."""

    def __init__(self, spec, resolved, records, out_dir, every_s: float = 5.0):
        self.spec, self.resolved, self.records, self.out_dir = spec, resolved, records, out_dir
        self.every_s, self.last = every_s, 0.0

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> pd.DataFrame:
        table = points_table(self.spec, self.resolved, self.records)
        atomic_write_parquet(table, self.out_dir / POINTS_FILE)
        atomic_write_text(self.out_dir / "points.csv", table.to_csv(index=False))
        self.last = time.monotonic()
        return table


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="point", disable=not enabled, dynamic_ncols=True)


def _execute_all(points: list[ResolvedPoint], jobs: int | None, ray_address: str | None,
                 runner: Callable) -> Iterable[tuple[str, dict]]:
    """Yield (key, outcome) as points finish, in completion order."""
    if not points:
        return
    if ray_address:
        yield from _execute_ray(points, ray_address, runner, jobs)
        return
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(points)))
    if jobs == 1:
        for rp in points:
            yield rp.key, execute_point(rp.config, runner)
        return
    # spawn, not fork: a forked child would inherit the driver's tqdm thread and any torch state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(execute_point, rp.config, runner): rp.key for rp in points}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # noqa: BLE001 - the worker died (killed, out of memory)
                        outcome = {"status": "error", "error": f"worker process died: {_one_line(exc)}",
                                   "wall_s": 0.0}
                    yield futures[fut], outcome
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong host:port; ray.init itself retries for minutes before giving up."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto' or a form Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise KvsimError(f"--ray {address}: cannot reach the Ray cluster: {exc}") from None


def _execute_ray(points: list[ResolvedPoint], address: str, runner: Callable, jobs: int | None):
    """Run points as Ray tasks on the cluster at `address` ('local' starts one here with `jobs` CPUs).

    Workers need kvsim importable and the trace files at the same paths (a shared checkout)."""
    try:
        import ray
    except ImportError:
        raise KvsimError(f"--ray {address}: the ray package is not installed; pip install 'kvsim[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address == "local":
            kwargs["num_cpus"] = jobs or os.cpu_count()
        else:
            _check_reachable(address)
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection errors are user input errors here
            raise KvsimError(f"--ray {address}: cannot connect: {_one_line(exc)}") from None
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(execute_point)
        refs = {task.remote(rp.config, runner): rp.key for rp in points}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task whose worker crashed
                    outcome = {"status": "error", "error": f"ray task failed: {_one_line(exc)}", "wall_s": 0.0}
                yield refs[ref], outcome
    finally:
        if started:
            ray.shutdown()
