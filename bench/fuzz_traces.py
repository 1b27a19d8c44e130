"""Fuzz the canonical trace reader: every column of every row mutated, in .jsonl, .csv and .parquet, plus
whole-file cases (empty, binary, non-UTF-8, truncated, parquet footers that claim absurd sizes), and every
key of every line of a Mooncake JSONL (sim/trace_mooncake.py: a bad line is skipped and counted).

    python bench/fuzz_traces.py [--quick] [--timeout 30] [--mem-gb 6]

Each case is read by `sim.trace.read_trace` (and, when accepted, summarised by `trace_stats`) in a worker
process with a memory limit; a case that runs past --timeout twice (the second time in a fresh worker)
is a hang, a worker that dies is a crash.
The outcome of every case is one of:
  clean error   a one-line KvsimError that names the file
  accepted      read, and every cell equals what was written (a valid value, or a valid trace); for
                Mooncake, a bad line skipped and counted while strict mode stops at it
  bad accepted  read although a cell was invalid, or read back as another value (silent acceptance)
  traceback     any other exception, or a KvsimError of several lines or without the file name
  hang / crash  past the timeout, or the worker died (memory limit, segfault)
The script prints the counts and the first failures, and exits 1 if any case is not a clean error or
an accepted valid trace. tests/test_trace_fuzz.py runs the same cases in-process (no hang guard).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import multiprocessing as mp
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.trace import COLUMNS, MAX_SPAN_S, MAX_TIME_S, MAX_TOKENS, MAX_TURN  # noqa: E402

FORMATS = (".jsonl", ".csv", ".parquet")

# A small valid trace touching every rule: prefix rows (one-turn sessions), a session with a
# think-time turn and a pinned turn. Every row has a distinct prompt_tokens and output_tokens, which
# identify it after the reader sorts the rows.
BASE = [
    {"session_id": "s0", "turn": 0, "arrival_s": 0.0, "think_s": None, "prompt_tokens": 600, "output_tokens": 20,
     "prefix_hashes": [11, 12]},
    {"session_id": "s1", "turn": 0, "arrival_s": 1.5, "think_s": None, "prompt_tokens": 50, "output_tokens": 10,
     "prefix_hashes": None},
    {"session_id": "s1", "turn": 1, "arrival_s": None, "think_s": 2.0, "prompt_tokens": 30, "output_tokens": 5,
     "prefix_hashes": None},
    {"session_id": "s1", "turn": 2, "arrival_s": 30.0, "think_s": None, "prompt_tokens": 10, "output_tokens": 3,
     "prefix_hashes": None},
    {"session_id": "s2", "turn": 0, "arrival_s": 3.0, "think_s": None, "prompt_tokens": 70, "output_tokens": 7,
     "prefix_hashes": [11, 13]},
]
ABSENT = object()  # the cell is left out (JSONL: key missing; CSV: empty field; parquet: null)

# Every column gets every value: wrong types, missing, non-finite, zero, negative, beyond every bound.
VALUES = [
    ("str", "abc"), ("numeric str", "12"), ("empty str", ""), ("true", True), ("false", False),
    ("list", [1, 2]), ("dict", {"a": 1}), ("null", None), ("absent", ABSENT), ("NaN", math.nan),
    ("+inf", math.inf), ("-inf", -math.inf), ("0", 0), ("-0.0", -0.0), ("-1", -1), ("1.5", 1.5), ("7", 7),
    ("1e12", 1e12), ("1e308", 1e308), ("2^63", 2**63), ("2^64", 2**64), ("1e18 int", 10**18),
    ("1e9+1", MAX_TOKENS + 1),
]
HASH_VALUES = [
    ("digits str", "123"), ("floats", [1.7, 2.2]), ("integral floats", [1.0, 2.0]), ("bools", [True, False]),
    ("empty list", []), ("2^64 id", [2**64]), ("-2^63 id", [-(2**63)]), ("nested", [[1], [2]]),
    ("str ids", ["a", "b"]), ("one id", [5]), ("null in list", [1, None]),
]


# ---------------------------------------------------------------- writing a mutated trace

def _csv_cell(v) -> str:
    if v is None or v is ABSENT:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_rows(rows: list[dict], fmt: str, path: Path) -> dict:
    """Write rows in the format. For parquet, a column pyarrow cannot type (one string in an int
    column) is stored as strings, and pyarrow may convert a value (true in a float column is 1.0):
    returns {"raw": the rows as pyarrow reads them back} so that the oracle judges what is stored."""
    if fmt == ".jsonl":
        lines = [json.dumps({k: v for k, v in r.items() if v is not ABSENT}) for r in rows]
        path.write_text("".join(x + "\n" for x in lines))
    elif fmt == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_csv_cell(r.get(c, ABSENT)) for c in COLUMNS])
        path.write_text(buf.getvalue())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {}
        for c in COLUMNS:
            vals = [None if r.get(c, ABSENT) is ABSENT else r[c] for r in rows]
            try:
                arrays[c] = pa.array(vals, from_pandas=True)
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                arrays[c] = pa.array([None if v is None else str(v) for v in vals])
        pq.write_table(pa.table(arrays), path)
        return {"raw": pq.read_table(path).to_pylist()}
    return {}


# ---------------------------------------------------------------- what a cell should read back as

BAD = "bad"
MISSING = "missing"


def _stored(v, col: str, fmt: str, raw=ABSENT):
    """The value the file really holds for an intended cell value (`raw`: parquet's stored cell)."""
    if fmt == ".parquet" and raw is not ABSENT:
        return raw
    if v is ABSENT:
        return None
    if fmt == ".csv":  # text: a number reads as that number, an empty field as missing
        text = _csv_cell(v)
        if col == "session_id":
            return text if text.strip() else None
        if col == "prefix_hashes":
            return v if isinstance(v, list) else (None if text == "" else text)
        if isinstance(v, str):
            try:
                return None if v == "" else (int(v) if v.lstrip("-").isdigit() else float(v))
            except ValueError:
                return v
        return v if not isinstance(v, bool) else text
    return v


def expected_cell(v, col: str, fmt: str, raw=ABSENT):
    """BAD, MISSING or the canonical value a reader must return for this cell."""
    s = _stored(v, col, fmt, raw)
    missing = s is None or (isinstance(s, float) and math.isnan(s))
    number = isinstance(s, (int, float)) and not isinstance(s, bool)
    if col == "session_id":
        if isinstance(s, str) and s.strip():
            return s
        return str(s) if isinstance(s, int) and not isinstance(s, bool) else BAD
    if col == "prefix_hashes":
        if missing:
            return MISSING
        if (isinstance(s, list) and s and all(isinstance(h, int) and not isinstance(h, bool)
                                               and -(2**63) <= h < 2**63 for h in s)):
            return list(s)
        return BAD
    if col in ("arrival_s", "think_s"):
        if missing:
            return MISSING
        hi = MAX_TIME_S if col == "arrival_s" else MAX_SPAN_S
        return float(s) + 0.0 if number and math.isfinite(s) and 0 <= s <= hi else BAD
    lo, hi = (1, MAX_TOKENS) if col == "output_tokens" else (0, MAX_TURN if col == "turn" else MAX_TOKENS)
    if number and math.isfinite(s) and float(s).is_integer() and lo <= s <= hi:
        return int(s)
    return BAD


def _canonical_base():
    return {(r["prompt_tokens"], r["output_tokens"]): r for r in BASE}


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    fmt: str
    write: object = None                 # callable(path) -> {"raw": stored parquet rows} or {}
    cell: tuple | None = None            # (row index, column, value) of a cell mutation
    rows_subset_ok: bool = False         # accepted only if every row read is one of BASE's rows
    must_fail: bool = False              # a whole-file case that no reader may accept
    extra: dict = field(default_factory=dict)


def cell_cases(formats=FORMATS, rows=None) -> list[Case]:
    out = []
    rows = range(len(BASE)) if rows is None else rows
    for fmt in formats:
        for i in rows:
            for col in COLUMNS:
                values = VALUES + (HASH_VALUES if col == "prefix_hashes" else [])
                for label, v in values:
                    mutated = copy.deepcopy(BASE)
                    mutated[i][col] = v

                    def write(path, mutated=mutated, fmt=fmt):
                        return write_rows(mutated, fmt, path)
                    out.append(Case(f"{fmt} row {i} {col}={label}", fmt, write, cell=(i, col, v)))
    return out


def _base_bytes(fmt: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"t{fmt}"
        write_rows(BASE, fmt, p)
        return p.read_bytes()


def _bytes_case(name, fmt, data: bytes, **kw) -> Case:
    return Case(name, fmt, lambda path: path.write_bytes(data) and {}, **kw)


def _thrift_paths(tree, prefix=()):
    """Paths to every integer field of a decoded thrift struct (see ThriftCompact)."""
    for k, (_, t, v) in enumerate(tree):
        if t == 12:
            yield from _thrift_paths(v, prefix + (k,))
        elif t in (9, 10) and v[0] == 12:
            for j, x in enumerate(v[1]):
                yield from _thrift_paths(x, prefix + (k, j))
        elif t in (4, 5, 6):
            yield prefix + (k,)


def _thrift_set(tree, path, value):
    tree = copy.deepcopy(tree)
    node, i = tree, 0
    while i < len(path) - 1:
        _, t, v = node[path[i]]
        if t == 12:
            node, i = v, i + 1
        else:
            node, i = v[1][path[i + 1]], i + 2
    node[path[-1]][2] = value
    return tree


def footer_cases(all_fields: bool) -> list[Case]:
    """Parquet files whose footer claims absurd sizes: every integer of the footer (row counts, sizes,
    offsets, types, ...) set to 2^62, 2^31-1 and -1, and the footer length itself."""
    data = _base_bytes(".parquet")
    n = int.from_bytes(data[-8:-4], "little")
    body, footer = data[:-8 - n], data[-8 - n:-8]
    tree, _ = ThriftCompact.read_struct(footer, 0)
    out = [_bytes_case("parquet footer length 2^31-1", ".parquet", data[:-8] + (2**31 - 1).to_bytes(4, "little") + b"PAR1",
                       must_fail=True),
           _bytes_case("parquet footer length 0", ".parquet", data[:-8] + (0).to_bytes(4, "little") + b"PAR1", must_fail=True)]
    paths = list(_thrift_paths(tree))
    if not all_fields:  # num_rows of the file and of the row group, and the first column chunk's sizes
        paths = [p for p in paths if p in {(2,), (3, 0, 1), (3, 0, 2)} or p[:5] == (3, 0, 0, 0, 1)]
    for p in paths:
        for value in (2**62, 2**31 - 1, -1):
            f = ThriftCompact.write_struct(_thrift_set(tree, p, value))
            blob = body + f + len(f).to_bytes(4, "little") + b"PAR1"
            # a changed footer may still describe the same data (e.g. a statistic): then reading it
            # back unchanged is right, anything else must be an error
            out.append(_bytes_case(f"parquet footer field {p} = {value}", ".parquet", blob, rows_subset_ok=True))
    return out


def file_cases(wide: bool) -> list[Case]:
    rng = random.Random(0)
    out = []
    for fmt in FORMATS:
        base = _base_bytes(fmt)
        out += [_bytes_case(f"{fmt} empty", fmt, b"", must_fail=True),
                _bytes_case(f"{fmt} blank", fmt, b"\n \n", must_fail=True)]
        for size in (1, 7, 100, 4096) + ((1 << 20,) if wide else ()):
            out.append(_bytes_case(f"{fmt} {size} random bytes", fmt, rng.randbytes(size), must_fail=True))
        out.append(_bytes_case(f"{fmt} NUL bytes", fmt, b"\0" * 64, must_fail=True))
        cuts = sorted({1, 2, len(base) // 3, len(base) // 2, len(base) - 9, len(base) - 2, len(base) - 1}
                      | (set(range(1, len(base))) if wide else set()))
        for k in cuts:
            out.append(_bytes_case(f"{fmt} truncated to {k} of {len(base)} bytes", fmt, base[:k], rows_subset_ok=True))
        for other in FORMATS:
            if other != fmt:
                out.append(_bytes_case(f"{other} file named {fmt}", fmt, _base_bytes(other), must_fail=True))
    # text formats: a non-UTF-8 byte inside a value, a BOM (valid), a 10^18 count, odd JSON
    jl, cs = _base_bytes(".jsonl"), _base_bytes(".csv")
    out += [
        _bytes_case(".jsonl non-UTF-8 byte", ".jsonl", jl.replace(b'"s1"', b'"s\xff1"', 1), must_fail=True),
        _bytes_case(".csv non-UTF-8 byte", ".csv", cs.replace(b"s1,", b"s\xff1,", 1), must_fail=True),
        _bytes_case(".jsonl latin-1 file", ".jsonl", jl.replace(b'"s1"', '"s\u00e91"'.encode("latin-1")), must_fail=True),
        _bytes_case(".jsonl UTF-8 BOM", ".jsonl", b"\xef\xbb\xbf" + jl, rows_subset_ok=True),
        _bytes_case(".csv UTF-8 BOM", ".csv", b"\xef\xbb\xbf" + cs, rows_subset_ok=True),
        _bytes_case(".jsonl 10^18 prompt tokens", ".jsonl", jl.replace(b'"prompt_tokens": 600', b'"prompt_tokens": 1000000000000000000'),
                    must_fail=True),
        _bytes_case(".jsonl 10^5-digit prompt", ".jsonl", jl.replace(b'"prompt_tokens": 600', b'"prompt_tokens": ' + b"9" * 100_000),
                    must_fail=True),
        _bytes_case(".jsonl 10^5-deep nesting", ".jsonl", jl + b"[" * 100_000 + b"\n", must_fail=True),
        _bytes_case(".jsonl duplicate key", ".jsonl", jl.replace(b'"turn": 0,', b'"turn": 0, "turn": 1,', 1), must_fail=True),
        _bytes_case(".jsonl row is a list", ".jsonl", jl + b"[1, 2]\n", must_fail=True),
        _bytes_case(".jsonl unknown key", ".jsonl", jl.replace(b'"turn": 0,', b'"turn": 0, "user": 1,', 1), must_fail=True),
        _bytes_case(".csv 10^18 prompt tokens", ".csv", cs.replace(b",600,", b",1000000000000000000,"), must_fail=True),
        _bytes_case(".csv extra field", ".csv", cs.replace(b"\n", b",9\n", 2), must_fail=True),
        _bytes_case(".csv no newline at end", ".csv", cs.rstrip(b"\n"), must_fail=True),
        _bytes_case(".csv quoted newline in id", ".csv", cs.replace(b"s2,", b'"s\n2",'), rows_subset_ok=True,
                    extra={"renamed": {"s2": "s\n2"}}),
        _bytes_case(".csv duplicate column", ".csv", cs.replace(b"turn,", b"turn,turn,", 1), must_fail=True),
    ]
    if wide:  # one JSONL line longer than the reader's limit (64 MiB), no newline
        out.append(Case(".jsonl 65 MiB line", ".jsonl",
                        lambda path: path.write_bytes(b" " * (65 << 20)) and {}, must_fail=True))
    # a parquet string column with invalid UTF-8 (as binary) and the pandas metadata replaced
    out.append(Case(".parquet binary session ids", ".parquet", _parquet_binary_ids, must_fail=True))
    out.append(Case(".parquet garbage pandas metadata", ".parquet", _parquet_bad_pandas_meta, rows_subset_ok=True))
    out.append(Case(".parquet list<list<int>> hashes", ".parquet", _parquet_nested_hashes, must_fail=True))
    return out


def _parquet_binary_ids(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {c: [r[c] for r in BASE] for c in COLUMNS}
    cols["session_id"] = [b"s\xff0", b"s1", b"s1", b"s1", b"s2"]
    pq.write_table(pa.table(cols), path)
    return {}


def _parquet_bad_pandas_meta(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({c: [r[c] for r in BASE] for c in COLUMNS})
    meta = {b"pandas": json.dumps({"index_columns": [{"kind": "range", "start": 0, "stop": 10**18, "step": 1}],
                                   "columns": [{"name": "x", "pandas_type": "zzz", "numpy_type": "zzz"}]}).encode()}
    pq.write_table(t.replace_schema_metadata(meta), path)
    return {}


def _parquet_nested_hashes(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {c: [r[c] for r in BASE] for c in COLUMNS}
    cols["prefix_hashes"] = [[[1]], None, None, None, [[2], [3]]]
    pq.write_table(pa.table(cols), path)
    return {}


# ---------------------------------------------------------------- Mooncake JSONL (sim/trace_mooncake.py)

MOONCAKE_BASE = [{"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": [1, 2]},
                 {"timestamp": 1500, "input_length": 700, "output_length": 10, "hash_ids": [1, 3]},
                 {"timestamp": 3000, "input_length": 300, "output_length": 5, "hash_ids": [4]}]


def mooncake_expected(key: str, v):
    """The canonical value a used line gets for a mutated key, or BAD when the line must be skipped."""
    if v is ABSENT:
        return BAD
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if key == "timestamp":
        return v / 1000.0 if number and math.isfinite(v) and 0 <= v <= MAX_TIME_S * 1000 else BAD
    if key == "hash_ids":
        ok = (isinstance(v, list) and v and all(isinstance(h, int) and not isinstance(h, bool) and -(2**63) <= h < 2**63
                                                for h in v))
        return list(v) if ok else BAD
    ok = number and math.isfinite(v) and float(v).is_integer() and 1 <= v <= MAX_TOKENS
    return int(v) if ok else BAD


def mooncake_cases() -> list[Case]:
    out = []
    for i in range(len(MOONCAKE_BASE)):
        for key in MOONCAKE_BASE[0]:
            for label, v in VALUES + (HASH_VALUES if key == "hash_ids" else []):
                rows = copy.deepcopy(MOONCAKE_BASE)
                rows[i][key] = v
                text = "".join(json.dumps({k: x for k, x in r.items() if x is not ABSENT}) + "\n" for r in rows)
                out.append(Case(f"mooncake line {i + 1} {key}={label}", ".jsonl",
                                lambda path, text=text: path.write_text(text) and {},
                                cell=(i, key, v), extra={"mooncake": True}))
    return out


def judge_mooncake(case: Case, path: Path) -> tuple[str, str]:
    """Non-strict import then the canonical validation, as `kvsim trace mooncake` does: a bad line is
    skipped and counted, a good one is read exactly; strict mode stops at the bad line."""
    from sim.errors import KvsimError
    from sim.trace import validate_trace
    from sim.trace_mooncake import read_mooncake
    from sim.trace_stats import trace_stats

    case.write(path)
    i, key, v = case.cell
    want = mooncake_expected(key, v)
    try:
        if want is BAD:  # strict mode stops at the bad line; the default skips it (checked below)
            try:
                read_mooncake(path, strict=True)
                return "bad accepted", f"strict mode read {key}={v!r}"
            except KvsimError as exc:
                if f"{path}:{i + 1}: " not in str(exc):
                    return "traceback", f"strict error does not name line {i + 1}: {exc}"
        df, report = read_mooncake(path)
        df = validate_trace(df, path)
        trace_stats(df)
    except KvsimError as exc:
        msg = str(exc)
        if "\n" in msg or str(path) not in msg:
            return "traceback", f"error not one line naming the file: {msg!r}"
        return "clean error", msg
    except Exception as exc:  # noqa: BLE001
        return "traceback", f"{type(exc).__name__}: {exc}"
    used = len(MOONCAKE_BASE) - (want is BAD)
    if len(df) != used or report.rows_used != used or sum(report.skipped.values()) != (want is BAD):
        return "bad accepted", f"{key}={v!r}: {len(df)} rows used, {dict(report.skipped)} skipped"
    col = {"timestamp": "arrival_s", "input_length": "prompt_tokens", "output_length": "output_tokens",
           "hash_ids": "prefix_hashes"}
    for r, line in zip(df.sort_values("session_id").to_dict("records"),
                       [j for j in range(len(MOONCAKE_BASE)) if not (j == i and want is BAD)]):
        src = {**MOONCAKE_BASE[line], **({key: want} if line == i else {})}
        src["timestamp"] = src["timestamp"] / 1000.0 if not (line == i and key == "timestamp") else src["timestamp"]
        for k, c in col.items():
            got = list(r[c]) if c == "prefix_hashes" else r[c]
            if got != src[k]:
                return "bad accepted", f"{key}={v!r}: line {line + 1} {c}={got!r}, expected {src[k]!r}"
    return "accepted", f"{key}={v!r}"


# ---------------------------------------------------------------- judging one case

def judge(case: Case, path: Path) -> tuple[str, str]:
    """(outcome, detail) for a case whose file is at `path`; runs the reader in this process."""
    from sim.errors import KvsimError
    from sim.trace import read_trace
    from sim.trace_stats import format_stats, trace_stats

    if case.extra.get("mooncake"):
        return judge_mooncake(case, path)
    written = case.write(path) or {}
    try:
        df = read_trace(path)
        format_stats(trace_stats(df))
    except KvsimError as exc:
        msg = str(exc)
        if "\n" in msg or str(path) not in msg:
            return "traceback", f"error not one line naming the file: {msg!r}"
        return "clean error", msg
    except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzz hunts
        import traceback
        return "traceback", "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return _check_accepted(case, df, written)


def _check_accepted(case: Case, df, written: dict) -> tuple[str, str]:
    if case.must_fail:
        return "bad accepted", f"read {len(df)} rows"
    rows = df.to_dict("records")
    base = _canonical_base()
    if case.cell is None:  # a whole-file case: every row read must be one of BASE's, unchanged
        renamed = case.extra.get("renamed", {})
        for r in rows:
            b = base.get((r["prompt_tokens"], r["output_tokens"]))
            if b is None or _diff(r, {**b, "session_id": renamed.get(b["session_id"], b["session_id"])}):
                return "bad accepted", f"row {r} is not in the written trace"
        return "accepted", f"{len(rows)} rows"
    i, col, v = case.cell
    want = expected_cell(v, col, case.fmt, written["raw"][i][col] if "raw" in written else ABSENT)
    if want is BAD:
        return "bad accepted", f"{col}={v!r} read as {[r[col] for r in rows]}"
    key = "output_tokens" if col == "prompt_tokens" else "prompt_tokens"
    for r in rows:
        b = next(b for b in BASE if b[key] == r[key])
        expect = dict(b)
        if b is BASE[i]:
            expect[col] = None if want is MISSING else want
        bad = _diff(r, expect)
        if bad:
            return "bad accepted", f"{col}={v!r}: read {bad}"
    return "accepted", f"{col}={v!r}"


def _diff(got: dict, want: dict) -> str:
    for c in COLUMNS:
        g, w = got[c], want[c]
        g = None if g is None or (isinstance(g, float) and math.isnan(g)) else g
        g = list(g) if hasattr(g, "__len__") and not isinstance(g, str) else g
        if g != w or type(g) is bool:
            return f"{c}={g!r}, expected {w!r}"
    return ""


# ---------------------------------------------------------------- the thrift compact protocol (parquet footers)

class ThriftCompact:
    """Just enough of Apache Thrift's compact protocol to decode a parquet footer, change an integer in
    it and encode it again (types: bool, byte, i16/i32/i64 zigzag varints, double, binary, list/set, struct)."""

    @staticmethod
    def _varint(b, i):
        shift = v = 0
        while True:
            x = b[i]
            i += 1
            v |= (x & 0x7F) << shift
            shift += 7
            if not x & 0x80:
                return v, i

    @staticmethod
    def _enc_varint(v):
        out = bytearray()
        while True:
            if v < 0x80:
                out.append(v)
                return bytes(out)
            out.append((v & 0x7F) | 0x80)
            v >>= 7

    @classmethod
    def read_value(cls, b, i, t):
        if t in (1, 2):
            return t == 1, i
        if t == 3:
            return b[i], i + 1
        if t in (4, 5, 6):
            v, i = cls._varint(b, i)
            return (v >> 1) ^ -(v & 1), i
        if t == 7:
            return struct.unpack_from("<d", b, i)[0], i + 8
        if t == 8:
            n, i = cls._varint(b, i)
            return bytes(b[i:i + n]), i + n
        if t in (9, 10):
            h = b[i]
            i += 1
            n, et = h >> 4, h & 15
            if n == 15:
                n, i = cls._varint(b, i)
            items = []
            for _ in range(n):
                if et in (1, 2):
                    items.append(b[i] == 1)
                    i += 1
                else:
                    v, i = cls.read_value(b, i, et)
                    items.append(v)
            return (et, items), i
        if t == 12:
            return cls.read_struct(b, i)
        raise ValueError(f"thrift type {t} not handled")

    @classmethod
    def read_struct(cls, b, i):
        fields, last = [], 0
        while True:
            h = b[i]
            i += 1
            if h == 0:
                return fields, i
            d, t = h >> 4, h & 15
            if d:
                fid = last + d
            else:
                v, i = cls._varint(b, i)
                fid = (v >> 1) ^ -(v & 1)
            val, i = cls.read_value(b, i, t)
            fields.append([fid, t, val])
            last = fid

    @classmethod
    def write_value(cls, t, v):
        if t in (1, 2):
            return b""
        if t == 3:
            return bytes([v])
        if t in (4, 5, 6):
            return cls._enc_varint(((v << 1) ^ (v >> 63)) & ((1 << 64) - 1))
        if t == 7:
            return struct.pack("<d", v)
        if t == 8:
            return cls._enc_varint(len(v)) + v
        if t in (9, 10):
            et, items = v
            head = bytes([(len(items) << 4) | et]) if len(items) < 15 else bytes([0xF0 | et]) + cls._enc_varint(len(items))
            return head + b"".join((b"\x01" if x else b"\x02") if et in (1, 2) else cls.write_value(et, x) for x in items)
        if t == 12:
            return cls.write_struct(v)
        raise ValueError(f"thrift type {t} not handled")

    @classmethod
    def write_struct(cls, fields):
        out, last = bytearray(), 0
        for fid, t, val in fields:
            if t in (1, 2):
                t = 1 if val else 2
            d = fid - last
            out += bytes([(d << 4) | t]) if 0 < d <= 15 else bytes([t]) + cls._enc_varint((fid << 1) ^ (fid >> 63))
            out += cls.write_value(t, val)
            last = fid
        return bytes(out + b"\x00")


# ---------------------------------------------------------------- running with a hang and memory guard

def all_cases(wide: bool) -> list[Case]:
    return cell_cases() + file_cases(wide) + footer_cases(all_fields=wide) + mooncake_cases()


def _worker(conn, mem_bytes: int, wide: bool):
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    cases = all_cases(wide)
    with tempfile.TemporaryDirectory(prefix="kvsim_fuzz_") as tmp:
        while True:
            k = conn.recv()
            if k is None:
                return
            case = cases[k]
            path = Path(tmp) / f"case{k}{case.fmt}"
            t0 = time.perf_counter()
            outcome, detail = judge(case, path)
            conn.send((outcome, detail, time.perf_counter() - t0))
            path.unlink(missing_ok=True)


def run(wide: bool, timeout_s: float, mem_gb: float) -> int:
    cases = all_cases(wide)
    ctx = mp.get_context("spawn")
    counts = {k: 0 for k in ("clean error", "accepted", "bad accepted", "traceback", "hang", "crash")}
    failures, slowest = [], (0.0, "")
    proc = conn = None
    retried = 0
    t_start = time.perf_counter()
    for k, case in enumerate(cases):
        for attempt in (1, 2):  # a case past the timeout runs again in a fresh worker: a shared, loaded
            if proc is None:    # machine can stall a process for seconds, a real hang stalls it twice
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, int(mem_gb * (1 << 30)), wide), daemon=True)
                proc.start()
                first = True
            conn.send(k)
            if conn.poll(timeout_s + (60 if first else 0)):  # a new worker pays the imports
                first = False
                try:
                    outcome, detail, secs = conn.recv()
                    slowest = max(slowest, (secs, case.name))
                except EOFError:
                    outcome, detail = "crash", f"worker died (exit {proc.join(5) or proc.exitcode})"
            else:
                outcome, detail = ("hang", f"> {timeout_s} s") if proc.is_alive() else ("crash", f"worker exit {proc.exitcode}")
            if outcome in ("hang", "crash"):
                proc.kill()
                proc.join()
                proc = None
            if outcome != "hang":
                break
            retried += 1
        counts[outcome] += 1
        if outcome not in ("clean error", "accepted"):
            failures.append(f"{outcome}: {case.name}: {detail}")
    if proc is not None:
        conn.send(None)
        proc.join(10)
    print(f"{len(cases)} cases in {time.perf_counter() - t_start:.0f} s "
          f"({'wide' if wide else 'quick'}; timeout {timeout_s} s, memory limit {mem_gb} GiB per worker)")
    for name, n in counts.items():
        print(f"  {name:13s} {n}")
    print(f"  slowest case {slowest[0]:.2f} s: {slowest[1]}; {retried} case(s) past the timeout run again")
    for f in failures[:30]:
        print("  " + f)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the cases of tests/test_trace_fuzz.py only")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--mem-gb", type=float, default=6.0, help="address-space limit of the worker")
    a = ap.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    return run(not a.quick, a.timeout, a.mem_gb)


if __name__ == "__main__":
    sys.exit(main())
