"""Bounded argparse types shared by every `kvsim` subcommand.

Every number an option takes has a lower and an upper bound with a stated reason, as every config
field has (`sim.config.knob`): an unbounded option lets 1e308 or 2**64 through to the clock, to
`range()` or to a C int, where it becomes a hang, an OverflowError or a run that means nothing.
Where an option sets what a config field holds (a rate, a think time, a seed, a size), its bounds
are that field's, read from the field's metadata, so the two never disagree. An empty string is an
error, never "the default": options test `is not None`, and these types refuse ''.

argparse turns an `ArgumentTypeError` into `kvsim: error: argument --flag: <message>` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable

from sim.errors import KvsimError

# More worker processes than the largest single host has cores (2 x 192-core EPYC = 768 threads):
# beyond, the pool only costs memory and start-up time, and a C int would overflow at 2**31.
MAX_JOBS = 1024

# Beyond a thousandfold either way the fitted lengths round to 0 tokens or exceed every context window.
SCALE_RANGE = (1e-3, 1e3)
SCALE_WHY = "a thousandth to a thousand times the fitted lengths"



def _fmt(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _type(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse names the type in "invalid <name> value" for a ValueError
    return fn


def bounded_float(lo: float, hi: float, why: str, *, lo_open: bool = False, unit: str = "",
                  least_nonzero: float = 0.0) -> Callable[[str], float]:
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`); `why` says where the bounds come from.
    `least_nonzero`: a value of (0, least_nonzero) is refused too (0 itself is allowed)."""
    low = f"> {_fmt(lo)}" if lo_open else f">= {_fmt(lo)}"
    low += f" (0 or at least {_fmt(least_nonzero)})" if least_nonzero else ""
    expect = f"a finite number {low} and <= {_fmt(hi)}{' ' + unit if unit else ''} ({why})"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo) or 0 < v < least_nonzero:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")
        return v + 0.0  # -0 -> 0

    return _type(parse, "number")


def bounded_int(lo: int, hi: int, why: str, *, unit: str = "") -> Callable[[str], int]:
    """An integer in [lo, hi] (written in decimal digits); `why` says where the bounds come from."""
    expect = f"an integer from {lo:,} to {hi:,}{' ' + unit if unit else ''} ({why})"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:  # '', '1.5', 'nan', and integers of more digits than Python converts
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text[:40]!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text[:40]!r}")
        return v

    return _type(parse, "integer")


def byte_size(lo: float, hi: float, why: str) -> Callable[[str], float]:
    """A byte size (128GB, 2TiB, 137438953472; `sim.config.parse_bytes`) in [lo, hi], and a whole
    number of bytes at least 1 unless 0 (1e-300 bytes is no size)."""
    from sim.config import _bytes_text

    expect = f"a byte size from {_bytes_text(lo) if lo else '0'} to {_bytes_text(hi)} ({why})"

    def parse(text: str) -> float:
        from sim.config import parse_bytes

        try:
            v = parse_bytes(text)
        except KvsimError:
            raise argparse.ArgumentTypeError(f"expected {expect}, like 128GB or 2TiB, got {text[:40]!r}") from None
        if not lo <= v <= hi or 0 < v < 1:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text[:40]!r}")
        return v + 0.0

    return _type(parse, "size")


def listed(item: Callable[[str], object], max_items: int, example: str) -> Callable[[str], list]:
    """Comma-separated values of `item`, 1 to `max_items` of them; an empty item (1,,2) is an error."""

    def parse(text: str) -> list:
        parts = text.split(",")
        if len(parts) > max_items:
            raise argparse.ArgumentTypeError(f"expected at most {max_items} comma-separated values like {example}, "
                                             f"got {len(parts)}")
        out = []
        for p in parts:
            if not p.strip():
                raise argparse.ArgumentTypeError(f"expected comma-separated values like {example}, "
                                                 f"got {text[:60]!r} (an empty item)")
            try:
                out.append(item(p.strip()))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{p.strip()[:40]!r} in {text[:60]!r}: {exc}") from None
        return out

    return _type(parse, "list")


def non_empty(what: str) -> Callable[[str], str]:
    """A string that is not empty or blank ('' would otherwise read as "not given")."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return text

    return _type(parse, "string")


def knob_meta(cls, name: str) -> dict:
    """The metadata (`help`, `unit`, `lo`, `hi`, `why`, `size`) of config field `cls.name`."""
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def from_knob(cls, name: str, *, lo=None, lo_open: bool = False,
              least_nonzero: float = 0.0) -> Callable[[str], float | int]:
    """The argparse type of an option that sets config field `cls.name`: that field's type and bounds
    (`lo` raises the lower bound where the option needs more than the field, e.g. a step > 0;
    `least_nonzero` refuses the values between 0 and it)."""
    meta = knob_meta(cls, name)
    low = meta["lo"] if lo is None else lo
    tp = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    if meta.get("size"):
        return byte_size(low, meta["hi"], meta["why"])
    if tp in (int, "int", "Optional[int]"):
        return bounded_int(int(low), int(meta["hi"]), meta["why"], unit=meta["unit"])
    return bounded_float(low, meta["hi"], meta["why"], lo_open=lo_open, unit=meta["unit"], least_nonzero=least_nonzero)


def jobs() -> Callable[[str], int]:
    """--jobs: worker processes or simulations at once, 1 to MAX_JOBS."""
    return bounded_int(1, MAX_JOBS, "more than the cores of any single host")


def seed() -> Callable[[str], int]:
    """--seed: as the config's `seed` (0 to 2**32-1: numpy's legacy seeding takes 32 bits)."""
    from sim.config import Config

    return from_knob(Config, "seed")
