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


# --- output paths, checked before any work: a long run never fails at its end on a bad --out --------

def _name(path) -> str:
    """The path as typed, or escaped (and cut) when it would break the one-line error."""
    from sim.errors import show

    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return show(text)
    return text if text.isprintable() and len(text) <= 200 else show(text)


def _writable_ancestor(path: Path, flag: str, given) -> None:
    """The nearest existing ancestor of `path` is a folder where a file can be made."""
    import tempfile

    from sim.errors import KvsimError

    try:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_dir = probe.is_dir()
    except OSError as exc:  # a name longer than the filesystem allows, a loop of links
        raise KvsimError(f"{flag} {_name(given)}: {exc.strerror or exc}; expected a path in a writable folder") from None
    if not is_dir:
        raise KvsimError(f"{flag} {_name(given)}: {probe} is a file, not a folder; expected a path in a writable folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise KvsimError(f"{flag} {_name(given)}: cannot write in {probe} ({exc.strerror or exc}); expected a writable "
                         f"folder") from None


def _utf8(path: Path, flag: str) -> None:
    from sim.errors import KvsimError

    try:  # parquet writers take UTF-8 paths only: a name with undecodable bytes would fail after the run
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise KvsimError(f"{flag} {_name(path)}: not valid UTF-8; expected a name in UTF-8") from None


def check_out_dir(path, flag: str, create: bool = False) -> Path:
    """An output folder (`flag` names where it came from): a UTF-8 name, not an existing file, and
    writable (created first when `create`). One KvsimError line otherwise."""
    from sim.errors import KvsimError

    path = Path(path)
    _utf8(path, flag)
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as exc:
        raise KvsimError(f"{flag} {_name(path)}: {exc.strerror or exc}; expected a folder for the results") from None
    if is_file:
        raise KvsimError(f"{flag} {_name(path)}: exists and is not a folder; expected a folder for the results")
    _writable_ancestor(path, flag, path)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KvsimError(f"{flag} {_name(path)}: cannot create it ({exc.strerror or exc})") from None
    return path


def check_out_file(path, flag: str, suffixes: tuple = ()) -> Path:
    """An output file (written atomically: a temporary file beside it, then a rename): a UTF-8 name, one of
    `suffixes` when given, not a folder, and its folder writable. One KvsimError line otherwise."""
    from sim.errors import KvsimError

    path = Path(path)
    _utf8(path, flag)
    if suffixes and path.suffix not in suffixes:
        has = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise KvsimError(f"{flag} {_name(path)}: {has}, expected {' or '.join(suffixes)}")
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise KvsimError(f"{flag} {_name(path)}: {exc.strerror or exc}; expected the path of a file to write") from None
    if is_dir:
        raise KvsimError(f"{flag} {_name(path)}: is a folder; expected the path of a file to write")
    _writable_ancestor(path.parent, flag, path)
    return path
