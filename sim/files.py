"""Result files written atomically: a temporary file beside the target, then one rename.

A run killed mid-write leaves the previous file (or none), never half of one, so a resumed sweep
or a reader never sees a truncated result. Every module that writes a result file goes through here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def atomic_write(path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file in the target's folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj: Any, **kw) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, **kw))


def atomic_write_parquet(df, path) -> Path:
    return atomic_write(path, lambda p: df.to_parquet(p, index=False))
