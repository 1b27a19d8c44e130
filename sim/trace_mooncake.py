"""Mooncake FAST'25 traces -> canonical rows with prefix block hashes.

Each Mooncake line is one request: ``timestamp`` (ms since the trace start), ``input_length`` (the whole
input, history included), ``output_length`` and ``hash_ids``: ids of the input's 512-token prefix blocks,
equal ids meaning equal prefix KV. There is no session id, so reuse is by prefix: a request can reuse the
KV of its longest run of leading blocks that an earlier request (any earlier request) already produced.
That is what the canonical ``prefix_hashes`` column carries; every request is its own one-turn session
replayed at its timestamp (``arrival_s = timestamp / 1000``).

``chain_sessions`` is an optional second view: a request whose hash_ids extend an earlier request's
hash_ids is taken as the next turn of that request's conversation (the pattern CachedAttention serves,
arXiv 2403.19708), turning the trace into multi-turn sessions without block hashes.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.trace import BLOCK_TOKENS, COLUMNS, MAX_LINE_BYTES, MAX_TIME_S, MAX_TOKENS


@dataclass
class ImportReport:
    path: str
    rows_read: int = 0
    rows_used: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> rows skipped
    warnings: Counter = field(default_factory=Counter)  # reason -> rows kept but noteworthy
    examples: list = field(default_factory=list)

    def skip(self, line: int, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{self.path}:{line}: {reason}")

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.rows_read} rows read, {self.rows_used} used, {sum(self.skipped.values())} skipped"]
        out += [f"  skipped {n}: {r}" for r, n in self.skipped.most_common()]
        out += [f"  note {n}: {r}" for r, n in self.warnings.most_common()]
        out += [f"  e.g. {e}" for e in self.examples[:5]]
        return out


def _int_field(row: dict, key: str, lowest: int) -> int:
    v = row.get(key)
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer())
            or not lowest <= v <= MAX_TOKENS):
        raise ValueError(f"{key}={_short(v)}, expected an integer >= {lowest} and <= {MAX_TOKENS:,}")
    return int(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_row(text: str) -> tuple[float, int, int, list[int]]:
    """(arrival_s, input_length, output_length, hash_ids) of one line; ValueError says what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # a number of > 4300 digits, deep nesting
        raise ValueError(f"not readable JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in row]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    ts = row["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts <= MAX_TIME_S * 1000:
        raise ValueError(f"timestamp={_short(ts)}, expected milliseconds >= 0 and <= {MAX_TIME_S * 1000:.4g}")
    n_in = _int_field(row, "input_length", 1)
    n_out = _int_field(row, "output_length", 1)
    hashes = row["hash_ids"]
    if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                               and -(2**63) <= h < 2**63 for h in hashes):
        raise ValueError("hash_ids, expected a list of 64-bit integers")
    if not hashes:
        raise ValueError("hash_ids is empty, expected one id per 512-token block of the input")
    return ts / 1000.0, n_in, n_out, hashes


def _lines(path: Path):
    """(line number, text or None, why not) of each line, read with a length limit and UTF-8 checked,
    so that a binary file is a counted bad line, not a traceback or a line that fills the memory."""
    with path.open("rb") as fh:
        line_no = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                yield line_no, None, f"line longer than {MAX_LINE_BYTES >> 20} MiB"
                fh.readline()  # the rest of it, if it ever ends
                continue
            try:
                yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8"), ""
            except UnicodeDecodeError as exc:
                yield line_no, None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"


def read_mooncake(path, strict: bool = False) -> tuple[pd.DataFrame, ImportReport]:
    """Canonical rows (one single-turn session per request, in file order) and what was skipped.

    A bad line is skipped and counted with its file:line and reason; ``strict`` raises on the first one.
    """
    path = Path(path)
    if not path.is_file():
        raise KvsimError(f"{path}: {'is not a file' if path.exists() else 'file not found'}, expected a Mooncake JSONL trace")
    report = ImportReport(str(path))
    lines, arrival, n_in, n_out, hashes = [], [], [], [], []
    last_ts = -math.inf
    for line_no, text, unreadable in _lines(path):
        if text is not None and not text.strip():
            continue
        report.rows_read += 1
        try:
            if text is None:
                raise ValueError(unreadable)
            ts, i, o, h = parse_row(text)
        except ValueError as exc:
            if strict:
                raise KvsimError(f"{path}:{line_no}: {exc}") from None
            report.skip(line_no, str(exc))
            continue
        if len(h) != math.ceil(i / BLOCK_TOKENS):
            report.warnings[f"hash_ids count differs from ceil(input_length/{BLOCK_TOKENS})"] += 1
        if ts < last_ts:
            report.warnings["timestamp earlier than the line before (replayed in time order)"] += 1
        last_ts = max(last_ts, ts)
        lines.append(line_no)
        arrival.append(ts)
        n_in.append(i)
        n_out.append(o)
        hashes.append(h)
    report.rows_used = len(lines)
    if not lines:
        first = f"; first: {report.examples[0]}" if report.examples else ""
        raise KvsimError(f"{path}: no usable rows ({report.rows_read} read, all skipped{first})")
    width = len(str(max(lines)))
    df = pd.DataFrame({
        "session_id": [f"mc{n:0{width}d}" for n in lines],  # the source line: traceable and unique
        "turn": np.zeros(len(lines), dtype=np.int64),
        "arrival_s": np.asarray(arrival, dtype=float),
        "think_s": np.full(len(lines), np.nan),
        "prompt_tokens": np.asarray(n_in, dtype=np.int64),
        "output_tokens": np.asarray(n_out, dtype=np.int64),
        "prefix_hashes": pd.Series(hashes, dtype=object),
    }, columns=COLUMNS)
    return df, report


def prefix_hit_blocks(hash_lists, order=None) -> np.ndarray:
    """For each request, the number of leading blocks whose whole prefix an earlier request already had.

    Requests are taken in ``order`` (indices, default as given). A trie keyed by (parent node, block id)
    makes "same leading blocks" exact even if an id were reused under a different prefix.
    """
    n = len(hash_lists)
    order = range(n) if order is None else order
    children: dict[tuple[int, int], int] = {}
    hits = np.zeros(n, dtype=np.int64)
    for idx in order:
        node, k, matching = 0, 0, True
        for h in hash_lists[idx]:
            child = children.get((node, h))
            if child is None:
                matching = False
                child = children[(node, h)] = len(children) + 1
            elif matching:
                k += 1
            node = child
        hits[idx] = k
    return hits


def reusable_prefix_tokens(df: pd.DataFrame) -> np.ndarray:
    """Input tokens of each row that an infinite cache could serve from earlier requests' prefix blocks.

    Rows are replayed by arrival time (file order on ties); a full hit is capped at the input length
    because the last block of an input may be partial.
    """
    order = np.argsort(df["arrival_s"].to_numpy(dtype=float), kind="stable")
    hits = prefix_hit_blocks(df["prefix_hashes"].tolist(), order)
    return np.minimum(hits * BLOCK_TOKENS, df["prompt_tokens"].to_numpy())


def chain_sessions(df: pd.DataFrame, min_blocks: int = 2) -> tuple[pd.DataFrame, dict]:
    """Multi-turn view: request B continues request A when the ids of A's full blocks (at least
    ``min_blocks`` of them) are a prefix of B's hash_ids and B's input can hold A's input and reply
    (B.input >= A.input + A.output). A's last, partial block is left out of the match because the next
    turn appends A's reply to it, which changes that block's hash. ``min_blocks`` keeps requests that
    share only a common system prompt from being chained. Each A continues at most once (the earliest
    B); chained turns keep their own arrival time. Returns rows without prefix_hashes and counts."""
    order = np.argsort(df["arrival_s"].to_numpy(dtype=float), kind="stable")
    hashes = df["prefix_hashes"].tolist()
    n_in = df["prompt_tokens"].to_numpy()
    n_out = df["output_tokens"].to_numpy()
    arrival = df["arrival_s"].to_numpy(dtype=float)
    open_tails: dict[tuple, int] = {}   # full-block ids of a session's last request -> its row
    session_of = np.empty(len(df), dtype=np.int64)
    turn_of = np.zeros(len(df), dtype=np.int64)
    new_prompt = n_in.copy()
    n_sessions = 0
    too_short = 0
    for idx in order:
        h = tuple(hashes[idx])
        parent = None
        for k in range(len(h), min_blocks - 1, -1):  # longest earlier request whose full blocks are our prefix
            cand = open_tails.get(h[:k])
            if cand is not None:
                if n_in[idx] >= n_in[cand] + n_out[cand]:
                    parent = cand
                else:
                    too_short += 1
                break
        if parent is None:
            session_of[idx] = n_sessions
            n_sessions += 1
        else:
            del open_tails[tuple(hashes[parent][:n_in[parent] // BLOCK_TOKENS])]
            session_of[idx] = session_of[parent]
            turn_of[idx] = turn_of[parent] + 1
            new_prompt[idx] = n_in[idx] - n_in[parent] - n_out[parent]
        key = h[:n_in[idx] // BLOCK_TOKENS]
        if len(key) >= min_blocks:
            open_tails.setdefault(key, idx)
    width = len(str(max(n_sessions - 1, 0)))
    out = pd.DataFrame({
        "session_id": [f"mcs{s:0{width}d}" for s in session_of],
        "turn": turn_of,
        "arrival_s": arrival,  # every turn is replayed at its own timestamp
        "think_s": np.full(len(df), np.nan),
        "prompt_tokens": new_prompt.astype(np.int64),
        "output_tokens": n_out.astype(np.int64),
        "prefix_hashes": np.full(len(df), None, dtype=object),
    }, columns=COLUMNS)
    chained = int((turn_of > 0).sum())
    info = {"requests": len(df), "sessions": n_sessions, "chained_requests": chained,
            "multi_turn_sessions": int(pd.Series(session_of[turn_of > 0]).nunique()),
            "prefix_but_too_short": too_short}
    return out, info
