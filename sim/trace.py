"""The canonical trace: one row per turn (request), the only workload format the simulator reads.

Columns (see traces/README.md):
  session_id     str    conversation id; turns of one session share their history KV
  turn           int    0-based index of the turn inside its session
  arrival_s      float  absolute arrival time in seconds; required for turn 0, optional later
                        (when set on a later turn, the turn is replayed at that time, e.g. Mooncake)
  think_s        float  for turns without arrival_s: user think time after the previous reply ended
  prompt_tokens  int    new tokens this turn adds (user message, plus chat-template tokens)
  output_tokens  int    tokens of the reply
  prefix_hashes  list[int] or None  hashes of 512-token blocks of the whole input, for prefix reuse
                        across requests (Mooncake); when present the request's input is
                        prompt_tokens tokens long and reuse is decided by shared leading blocks
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from sim.errors import KvsimError

BLOCK_TOKENS = 512
COLUMNS = ["session_id", "turn", "arrival_s", "think_s", "prompt_tokens", "output_tokens", "prefix_hashes"]
_REQUIRED = ["session_id", "turn", "prompt_tokens", "output_tokens"]


def read_trace(path) -> pd.DataFrame:
    """Load a canonical trace (.parquet, .jsonl or .csv) and validate it; errors name file:line."""
    path = Path(path)
    if not path.exists():
        raise KvsimError(f"{path}: trace file not found")
    lines = None  # file line of each row; parquet has none
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            df, lines = _read_jsonl(path)
        elif path.suffix == ".csv":
            df = pd.read_csv(path)
            lines = list(range(2, len(df) + 2))  # after the header; quoted newlines would shift this
        else:
            raise KvsimError(f"{path}: unknown trace extension {path.suffix!r}, expected .parquet, .jsonl or .csv")
    except KvsimError:
        raise
    except Exception as exc:  # pyarrow / json errors carry long messages: keep the first line
        raise KvsimError(f"{path}: cannot read trace: {str(exc).splitlines()[0]}") from None
    return validate_trace(df, path, lines)


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """Rows of a JSONL file (one JSON object per line, blank lines ignored) and the line of each row.
    A bad line is named by file:line (pandas would only give a byte offset)."""
    rows, lines = [], []
    with path.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KvsimError(f"{path}:{line_no}: not valid JSON ({exc.msg}), expected one trace row object per line") from None
            if not isinstance(row, dict):
                raise KvsimError(f"{path}:{line_no}: expected a JSON object (one trace row), got {type(row).__name__}")
            rows.append(row)
            lines.append(line_no)
    return pd.DataFrame(rows), lines


def _plain(v):
    """numpy scalars print as np.int64(4): show users the plain value."""
    return v.item() if hasattr(v, "item") else v


def _hashes(v):
    """None, or a list of ints: JSONL gives NaN for a missing list and parquet gives numpy arrays."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return [int(x) for x in v]


def validate_trace(df: pd.DataFrame, path="<trace>", lines=None) -> pd.DataFrame:
    """Check schema and values; return a copy with canonical dtypes, sorted by session and turn.

    Rows are named by their file line when `lines` (the line of each row) is given, else by their
    0-based index.
    """
    def at(row):
        return f"{path}:{lines[row]}" if lines is not None else f"{path}: row {row}"

    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise KvsimError(f"{path}: missing column(s) {', '.join(missing)}; expected columns {COLUMNS}")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise KvsimError(f"{path}: unknown column(s) {', '.join(unknown)}; expected columns {COLUMNS}")
    if len(df) == 0:
        raise KvsimError(f"{path}: trace has no rows")
    df = df.copy()
    for col in ("arrival_s", "think_s"):
        if col not in df.columns:
            df[col] = math.nan
    if "prefix_hashes" not in df.columns:
        df["prefix_hashes"] = None
    df["session_id"] = df["session_id"].astype(str)
    for col in ("turn", "prompt_tokens", "output_tokens"):
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() | (vals < 0) | (vals != vals.round())
        if col == "output_tokens":
            bad |= vals < 1
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            need = "an integer >= 1" if col == "output_tokens" else "an integer >= 0"
            raise KvsimError(f"{at(row)}: {col}={_plain(df[col].iloc[row])!r}, expected {need}")
        df[col] = vals.astype("int64")
    for col in ("arrival_s", "think_s"):
        vals = pd.to_numeric(df[col], errors="coerce")
        # missing (null/NaN) is allowed; anything else that is not a finite number >= 0 is an error
        bad = (vals < 0) | vals.isin([math.inf]) | (vals.isna() & df[col].notna())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise KvsimError(f"{at(row)}: {col}={_plain(df[col].iloc[row])!r}, expected a finite number >= 0")
        df[col] = vals.astype("float64")
    try:
        df["prefix_hashes"] = [_hashes(v) for v in df["prefix_hashes"]]
    except (TypeError, ValueError):
        bad = next(i for i, v in enumerate(df["prefix_hashes"]) if not _hashes_ok(v))
        raise KvsimError(f"{at(bad)}: prefix_hashes={df['prefix_hashes'].iloc[bad]!r}, expected a list of integers") from None
    df["_row"] = range(len(df))  # the row's place in the file, for errors after sorting
    df = df.sort_values(["session_id", "turn"], kind="stable").reset_index(drop=True)
    first = df["turn"].to_numpy()
    sess = df["session_id"].to_numpy()
    src = df["_row"].to_numpy()
    for i in range(len(df)):
        expected = 0 if i == 0 or sess[i] != sess[i - 1] else first[i - 1] + 1
        if first[i] != expected:
            raise KvsimError(f"{at(int(src[i]))}: session {sess[i]!r}: turn {first[i]} follows turn "
                             f"{first[i - 1] if expected else 'nothing'}, expected turn {expected}")
    t0 = df["turn"] == 0
    if df.loc[t0, "arrival_s"].isna().any():
        r = df[t0 & df["arrival_s"].isna()].iloc[0]
        raise KvsimError(f"{at(int(r._row))}: session {r.session_id!r}: turn 0 has no arrival_s, expected seconds >= 0")
    later = ~t0 & df["arrival_s"].isna() & df["think_s"].isna()
    if later.any():
        r = df[later].iloc[0]
        raise KvsimError(f"{at(int(r._row))}: session {r.session_id!r} turn {r.turn}: needs arrival_s or think_s")
    return df[COLUMNS]


def _hashes_ok(v) -> bool:
    try:
        _hashes(v)
        return True
    except (TypeError, ValueError):
        return False


def write_trace(df: pd.DataFrame, path) -> Path:
    """Validate and write atomically (temp file + rename) so a killed build never leaves half a trace."""
    path = Path(path)
    df = validate_trace(df, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    elif path.suffix in (".jsonl", ".json"):
        df.to_json(tmp, orient="records", lines=True)
    else:
        raise KvsimError(f"{path}: unsupported output extension {path.suffix!r}, expected .parquet or .jsonl")
    tmp.replace(path)
    return path
