"""The canonical trace: one row per turn (request), the only workload format the simulator reads.

Columns (see traces/README.md):
  session_id     str    conversation id; turns of one session share their history KV
  turn           int    0-based index of the turn inside its session
  arrival_s      float  arrival time in seconds; required for turn 0, optional later (when set on a
                        later turn, the turn is replayed at that time, e.g. Mooncake). Read traces
                        keep times relative to the first arrival (see ``validate_trace``)
  think_s        float  for turns without arrival_s: user think time after the previous reply ended
  prompt_tokens  int    new tokens this turn adds (user message, plus chat-template tokens)
  output_tokens  int    tokens of the reply
  prefix_hashes  list[int] or None  hashes of 512-token blocks of the whole input, for prefix reuse
                        across requests (Mooncake); when present the request's input is
                        prompt_tokens tokens long and reuse is decided by shared leading blocks
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.files import atomic_write
from sim.units import HOUR

BLOCK_TOKENS = 512
COLUMNS = ["session_id", "turn", "arrival_s", "think_s", "prompt_tokens", "output_tokens", "prefix_hashes"]
_REQUIRED = ["session_id", "turn", "prompt_tokens", "output_tokens"]

# Plausibility bounds. A count or time beyond them is a unit or encoding mistake, and accepting it
# would overflow int64 sums (a negative history) or lose float64 resolution (TTFT rounded away).
MAX_TOKENS = 10**9            # per turn; a thousand times the longest context windows (1M tokens)
MAX_TURN = 10**9              # turn index
MAX_TIME_S = 2.0**43          # ~2.8e5 years; below it a float64 time keeps millisecond resolution
MAX_SPAN_S = 366 * 24 * HOUR  # a trace (and a think time) spans at most a year
# Arrivals are moved back by a whole number of these so that the first one falls in [0, step):
# subtracting a multiple of a power of two >= the values' float spacing is exact, and a trace
# that already starts within the first 18 hours is left bit-identical.
TIME_ORIGIN_STEP_S = 2.0**16
_INT64 = (-(2**63), 2**63 - 1)
MAX_LINE_BYTES = 64 << 20     # one JSONL row; a row of 2M block hashes fits
MAX_PARQUET_ROWS_PER_BYTE = 64  # a footer claiming more rows than this per byte of file is corrupt


def read_trace(path) -> pd.DataFrame:
    """Load a canonical trace (.parquet, .jsonl or .csv) and validate it; errors name file:line."""
    path = Path(path)
    if not path.exists():
        raise KvsimError(f"{path}: trace file not found")
    if not path.is_file():
        raise KvsimError(f"{path}: is not a file, expected a trace (.parquet, .jsonl or .csv)")
    lines = None  # file line of each row; parquet has none
    try:
        if path.suffix == ".parquet":
            df = _read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            df, lines = _read_jsonl(path)
        elif path.suffix == ".csv":
            df, lines = _read_csv(path)
        else:
            raise KvsimError(f"{path}: unknown trace extension {path.suffix!r}, expected .parquet, .jsonl or .csv")
    except KvsimError:
        raise
    except MemoryError:
        raise KvsimError(f"{path}: trace too large to read into memory") from None
    except Exception as exc:  # pyarrow / pandas errors carry long messages: keep the first line
        raise KvsimError(f"{path}: cannot read trace: {_first_line(exc)}") from None
    return validate_trace(df, path, lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _read_parquet(path: Path) -> pd.DataFrame:
    """The footer is checked before any data is read: a corrupt footer that claims billions of rows
    would otherwise make pyarrow allocate for them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta, size = pf.metadata, path.stat().st_size
    claims = [meta.num_rows] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if min(claims) < 0 or max(claims) > MAX_PARQUET_ROWS_PER_BYTE * size:
        raise KvsimError(f"{path}: parquet footer claims {max(claims, key=abs):,} rows in a {size:,}-byte file "
                         f"(corrupt file), expected at most {MAX_PARQUET_ROWS_PER_BYTE} rows per byte")
    _check_columns(pf.schema_arrow.names, path)
    return pd.read_parquet(path)


def _check_columns(names, path) -> None:
    names = [str(c) for c in names]
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise KvsimError(f"{path}: missing column(s) {', '.join(missing)}; expected columns {COLUMNS}")
    unknown = [c for c in names if c not in COLUMNS]
    if unknown:
        raise KvsimError(f"{path}: unknown column(s) {', '.join(_show(c) for c in unknown[:5])}; expected columns {COLUMNS}")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise KvsimError(f"{path}: column(s) {', '.join(twice)} given twice; expected each column once")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key {twice[0]!r} given twice")
    return dict(pairs)


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """Rows of a JSONL file (one JSON object per line, blank lines ignored) and the line of each row.
    A bad line is named by file:line (pandas would only give a byte offset); lines are read with a
    length limit so that a binary file without newlines cannot fill the memory."""
    rows, lines = [], []
    with path.open("rb") as fh:
        line_no = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                raise KvsimError(f"{path}:{line_no}: line longer than {MAX_LINE_BYTES >> 20} MiB, "
                                 "expected one trace row object per line")
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise KvsimError(f"{path}:{line_no}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                 f"{exc.start + 1}), expected one JSON trace row per line") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as exc:
                raise KvsimError(f"{path}:{line_no}: not valid JSON ({exc.msg}), expected one trace row object per line") from None
            except (ValueError, RecursionError) as exc:  # duplicate key, a number of > 4300 digits, deep nesting
                raise KvsimError(f"{path}:{line_no}: not a readable JSON row ({_first_line(exc)}), "
                                 "expected one trace row object per line") from None
            if not isinstance(row, dict):
                raise KvsimError(f"{path}:{line_no}: expected a JSON object (one trace row), got {type(row).__name__}")
            rows.append(row)
            lines.append(line_no)
    return pd.DataFrame(rows), lines


_CSV_INT = re.compile(r"[+-]?[0-9]+")
_CSV_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def _csv_number(cell: str):
    """A CSV cell of a numeric column: None when empty, a number when it spells one, else the text
    (which validation then rejects by name). Stricter than pandas: 'true' or '1_000' stay text."""
    text = cell.strip()
    if not text:
        return None
    if _CSV_INT.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # more digits than Python converts: far beyond any bound anyway
            return math.inf
    if _CSV_FLOAT.fullmatch(text):
        return float(text)
    return cell


def _csv_hashes(cell: str):
    """prefix_hashes in a CSV cell: empty, or a JSON list such as "[1, 2, 3]"."""
    text = cell.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
    return cell


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """Every cell is read as text and converted here, so that a typo is named rather than guessed
    (pandas would read a column of 'true' as booleans, pad a short row and drop a long row's extra
    field). Rows are named by their file line, quoted newlines included."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise KvsimError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}), expected a CSV trace") from None
    if not text.strip():
        raise KvsimError(f"{path}: trace has no rows (empty file)")
    if not text.endswith(("\n", "\r")):
        # CSV has no end marker: a file cut inside its last number would read as a smaller number
        raise KvsimError(f"{path}:{text.count(chr(10)) + 1}: the last line has no line end (truncated file?), "
                         "expected every CSV row to end with a newline")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        header = next(reader)
        _check_columns(header, path)
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise KvsimError(f"{path}:{reader.line_num}: {len(fields)} fields, expected {len(header)} "
                                 "as in the header (an empty field for a missing value)")
            rows.append(fields)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise KvsimError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    columns = {}
    for k, col in enumerate(header):
        cells = [r[k] for r in rows]
        if col == "prefix_hashes":
            columns[col] = [_csv_hashes(c) for c in cells]
        elif col == "session_id":
            columns[col] = [c if c.strip() else None for c in cells]
        else:
            columns[col] = [_csv_number(c) for c in cells]
    return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in columns.items()}), lines


def _show(v) -> str:
    """A cell as the user wrote it (numpy scalars print as np.int64(4)), cut short if long."""
    if hasattr(v, "item") and not isinstance(v, np.ndarray):
        v = v.item()
    text = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _numbers(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values as float64, missing, not a number) for a column. Booleans, strings, lists and other
    types are 'not a number' (JSON true is not one token); null / NaN is missing."""
    n = len(s)
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.full(n, math.nan), np.zeros(n, bool), np.ones(n, bool)
    if pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype="float64", na_value=math.nan)
        return v, np.isnan(v), np.zeros(n, bool)
    vals, missing, bad = np.full(n, math.nan), np.zeros(n, bool), np.zeros(n, bool)
    for i, x in enumerate(s.to_numpy(dtype=object)):
        if _is_missing(x):
            missing[i] = True
        elif isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
            bad[i] = True
        else:
            try:
                vals[i] = float(x)
            except OverflowError:  # a Python int beyond float range
                vals[i] = math.copysign(math.inf, x)
    return vals, missing, bad


def _ints(df, col, lo, hi, at) -> np.ndarray:
    v, missing, bad = _numbers(df[col])
    with np.errstate(invalid="ignore"):
        bad |= missing | ~np.isfinite(v) | (v < lo) | (v > hi) | (v != np.floor(v))
    if bad.any():
        row = int(bad.nonzero()[0][0])
        got = "is missing" if missing[row] else f"={_show(df[col].iloc[row])}"
        raise KvsimError(f"{at(row)}: {col}{got}, expected an integer >= {lo} and <= {hi:,}")
    return v.astype(np.int64)


def _times(df, col, hi, at) -> np.ndarray:
    """Seconds; missing (null / NaN) stays NaN, anything else must be a finite number in [0, hi]."""
    if col not in df.columns:
        return np.full(len(df), math.nan)
    v, missing, bad = _numbers(df[col])
    with np.errstate(invalid="ignore"):
        bad |= ~missing & (~np.isfinite(v) | (v < 0) | (v > hi))
    if bad.any():
        row = int(bad.nonzero()[0][0])
        why = "a year" if hi == MAX_SPAN_S else "2^43 s, beyond which a float64 time has no millisecond resolution"
        raise KvsimError(f"{at(row)}: {col}={_show(df[col].iloc[row])}, expected a finite number of seconds "
                         f">= 0 and at most {hi:.4g} ({why})")
    return v + 0.0  # -0.0 -> 0.0


def _session_ids(df, at) -> pd.Series:
    out = []
    for i, x in enumerate(df["session_id"].to_numpy(dtype=object)):
        if isinstance(x, str) and x.strip():
            out.append(x)
        elif isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
            out.append(str(x))
        else:
            raise KvsimError(f"{at(i)}: session_id={_show(x)}, expected a non-empty string")
    return pd.Series(out, dtype=object).astype(str)


def _hash_list(v):
    """None, or a non-empty list of int64 ids. JSONL gives lists, parquet numpy arrays; NaN or null
    is missing. A string, a float or a bool is not an id (no digit splitting, no truncation)."""
    if _is_missing(v):
        return None
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise ValueError
        if v.dtype.kind in "iu":
            items = v.tolist()
        elif v.dtype == object:
            items = list(v)
        else:
            raise ValueError  # floats, bools, strings
    elif isinstance(v, (list, tuple)):
        items = v
    else:
        raise ValueError
    if not items:
        raise ValueError
    out = []
    for h in items:
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)):
            raise ValueError
        h = int(h)
        if not _INT64[0] <= h <= _INT64[1]:
            raise ValueError
        out.append(h)
    return out


def _prefix_hashes(df, at) -> list:
    if "prefix_hashes" not in df.columns:
        return [None] * len(df)
    out = []
    for i, v in enumerate(df["prefix_hashes"].to_numpy(dtype=object)):
        try:
            out.append(_hash_list(v))
        except ValueError:
            raise KvsimError(f"{at(i)}: prefix_hashes={_show(v)}, expected null or a non-empty list of "
                             "64-bit integer block ids") from None
    return out


def validate_trace(df: pd.DataFrame, path="<trace>", lines=None) -> pd.DataFrame:
    """Check schema and values; return a new frame with canonical dtypes, sorted by session and turn.

    Every cell must have its column's type and lie within the bounds above; rows with prefix_hashes
    are one-turn sessions; turn 0 has arrival_s, a later turn arrival_s (which pins it; think_s is
    then unused) or think_s; a pinned later turn may not arrive before the turn before it.

    Times are kept relative to the first arrival: all arrivals are moved back by the largest multiple
    of ``TIME_ORIGIN_STEP_S`` not above the first one. The shift is exact, so large absolute times
    (epoch seconds, or milliseconds read as seconds) keep their differences and every consumer sees
    small numbers, where float64 resolves microseconds. Rows are named by their file line when
    `lines` (the line of each row) is given, else by their 0-based index.
    """
    def at(row):
        return f"{path}:{lines[row]}" if lines is not None else f"{path}: row {row}"

    if len(df.columns) == 0 or len(df) == 0:
        raise KvsimError(f"{path}: trace has no rows")
    _check_columns(df.columns, path)
    df = df.reset_index(drop=True)
    out = pd.DataFrame({"session_id": _session_ids(df, at)})
    out["turn"] = _ints(df, "turn", 0, MAX_TURN, at)
    out["arrival_s"] = _times(df, "arrival_s", MAX_TIME_S, at)
    out["think_s"] = _times(df, "think_s", MAX_SPAN_S, at)
    out["prompt_tokens"] = _ints(df, "prompt_tokens", 0, MAX_TOKENS, at)
    out["output_tokens"] = _ints(df, "output_tokens", 1, MAX_TOKENS, at)
    out["prefix_hashes"] = pd.Series(_prefix_hashes(df, at), dtype=object)
    out["_row"] = range(len(out))  # the row's place in the file, for errors after sorting
    out = out.sort_values(["session_id", "turn"], kind="stable").reset_index(drop=True)
    _check_sessions(out, at)
    arrival = out["arrival_s"].to_numpy()
    pinned = ~np.isnan(arrival)
    first, last = int(np.argmin(np.where(pinned, arrival, np.inf))), int(np.argmax(np.where(pinned, arrival, -np.inf)))
    if arrival[last] - arrival[first] > MAX_SPAN_S:
        raise KvsimError(f"{at(int(out['_row'].iloc[last]))}: session {out['session_id'].iloc[last]!r}: "
                         f"arrival_s={_show(arrival[last])} is "
                         f"{(arrival[last] - arrival[first]) / (24 * HOUR):,.0f} days after the first arrival "
                         f"({_show(arrival[first])}), expected a trace spanning at most a year")
    origin = math.floor(arrival[first] / TIME_ORIGIN_STEP_S) * TIME_ORIGIN_STEP_S
    out["arrival_s"] = arrival - origin
    return out[COLUMNS]


def _check_sessions(df: pd.DataFrame, at) -> None:
    """Turns 0, 1, 2, ... per session; how each turn arrives; prefix rows are one-turn sessions."""
    turn = df["turn"].to_numpy()
    sess = df["session_id"].to_numpy()
    src = df["_row"].to_numpy()
    arrival = df["arrival_s"].to_numpy()
    think = df["think_s"].to_numpy()
    has_hashes = df["prefix_hashes"].notna().to_numpy()
    earliest = 0.0  # the earliest time the previous turn of this session can arrive
    for i in range(len(df)):
        new = i == 0 or sess[i] != sess[i - 1]
        expected = 0 if new else turn[i - 1] + 1
        where = f"{at(int(src[i]))}: session {sess[i]!r}"
        if turn[i] != expected:
            raise KvsimError(f"{where}: turn {turn[i]} follows turn "
                             f"{'nothing' if new else turn[i - 1]}, expected turn {expected}")
        pinned, thinks = not math.isnan(arrival[i]), not math.isnan(think[i])
        if new:
            if not pinned:
                raise KvsimError(f"{where}: turn 0 has no arrival_s, expected seconds >= 0")
            earliest = arrival[i]
            continue
        if not (pinned or thinks):
            raise KvsimError(f"{where} turn {turn[i]}: needs arrival_s or think_s")
        if has_hashes[i] or has_hashes[i - 1]:
            raise KvsimError(f"{where} turn {turn[i]}: prefix_hashes on a session of several turns, "
                             "expected rows with prefix_hashes to be one-turn sessions")
        if pinned:
            if arrival[i] < earliest:
                raise KvsimError(f"{where} turn {turn[i]}: arrival_s={_show(arrival[i])} is before turn "
                                 f"{turn[i] - 1} arrives ({_show(earliest)} s or later), expected a later time")
            earliest = arrival[i]
        else:
            earliest = earliest + think[i]


def write_trace(df: pd.DataFrame, path) -> Path:
    """Validate and write atomically so a killed build never leaves half a trace."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise KvsimError(f"{path}: unsupported output extension {path.suffix!r}, expected .parquet or .jsonl")
    df = validate_trace(df, path)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return atomic_write(path, lambda tmp: df.to_json(tmp, orient="records", lines=True))
