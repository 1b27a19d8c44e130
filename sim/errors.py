"""One error type for bad user input: the CLI prints its message on one line and exits 2.

`read_yaml` is the one reader of YAML input files (configs, sweep specs, profiles): whatever the
file holds (not UTF-8, binary, a parquet trace, duplicate keys, nesting that would overflow the
stack), the answer is a value or one KvsimError naming the file and what was expected.
"""
from __future__ import annotations

from pathlib import Path

import yaml


class KvsimError(Exception):
    """Bad input (config, trace, CLI argument). The message names the file, the key and what was expected."""


def show(value, limit: int = 60) -> str:
    """repr of a bad value for a one-line message: newlines escaped (repr does), long ones cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with one key twice: YAML keeps the last value silently,
    so the earlier line the user may be editing would have no effect."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not None:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """YAML text -> value (as yaml.safe_load, but duplicate keys are an error); KvsimError
    '[line N: ]why' on anything it cannot read."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise KvsimError(f"line {exc.line}: key {show(exc.key)} given twice (first on line {exc.first}); "
                         f"expected each key once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise KvsimError(f"{line}invalid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise KvsimError("nested too deeply to read") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more digits than Python converts
        raise KvsimError(f"unreadable value ({str(exc).splitlines()[0][:80]})") from None


def _binary_kind(head: bytes) -> str | None:
    if head.startswith(b"PAR1"):
        return "a parquet file (a trace? a config names it as workload.trace)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if b"\x00" in head:
        return "a binary file"
    return None


def read_yaml(path, what: str, hint: str = ""):
    """Parse a YAML file or raise a one-line KvsimError naming the file and what was expected:
    '<file>: <what> not found', '<file>: expected a <what> (YAML text), got a parquet file',
    '<file>: line N: ...' (invalid YAML, a key given twice, a byte that is not UTF-8)."""
    p = Path(path)
    if p.is_dir():
        raise KvsimError(f"{path}: expected a {what} (YAML), got a folder")
    if not p.is_file():
        raise KvsimError(f"{path}: {what} not found{hint}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KvsimError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    kind = _binary_kind(data[:4096])
    if kind:
        raise KvsimError(f"{path}: expected a {what} (YAML text), got {kind}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise KvsimError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; expected a {what} "
                         f"saved as UTF-8 text") from None
    try:
        return parse_yaml(text)
    except KvsimError as exc:
        yaml_hint = "" if p.suffix.lower() in (".yaml", ".yml") else f" (expected a {what} in YAML)"
        raise KvsimError(f"{path}: {exc}{yaml_hint}") from None
