"""Synthetic multi-turn traces with the canonical schema, fitted to a real trace (ShareGPT by default).

What is fitted, and how (``fit``):
  * turns per session: the empirical probability mass function (value -> share of sessions);
  * new prompt tokens of turn 0, new prompt tokens of later turns, and output tokens: empirical
    quantile functions on a fixed probability grid (``QUANTILE_PROBS``). ``generate`` samples them by
    inverse-CDF: u ~ U(0, 1), linear interpolation between neighbouring quantiles. Turn 0 is kept apart
    because a conversation's opening message is usually longer (it carries the task) than follow-ups.
    Empirical quantiles rather than a lognormal fit: ShareGPT lengths are heavy-tailed and multi-modal
    (pasted code, truncated replies), which a lognormal would smooth away.
  * session arrivals: a Poisson process at ``session_rate_per_s``; think time between a reply and the
    next user turn: exponential with mean ``think_time_mean_s``. Both are fitted from the source trace,
    whose own arrivals are the chosen defaults stated in traces/README.md (not numbers from the
    CachedAttention paper, arXiv 2403.19708, which we could not confirm).

``prompt_scale`` / ``output_scale`` stretch the fitted lengths for sweeps over length; ``n_sessions`` and
``session_rate_per_s`` set the load: ``dataclasses.replace(SynthSpec.default(), n_sessions=..., ...)``.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sim.errors import KvsimError, read_yaml
from sim.files import atomic_write_text
from sim.trace import COLUMNS, MAX_TOKENS

# Finer steps in the upper tail, where p99 latency comes from.
QUANTILE_PROBS: tuple[float, ...] = tuple(
    float(p) for p in np.round(np.concatenate([np.linspace(0.0, 0.95, 96), np.linspace(0.955, 1.0, 10)]), 4))
DEFAULT_SPEC_PATH = Path(__file__).resolve().parents[1] / "traces" / "synth_default.yaml"


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of a synthetic workload; ``default()`` is fitted to traces/sharegpt_small.parquet."""

    n_sessions: int
    session_rate_per_s: float
    think_time_mean_s: float
    turns_values: tuple[int, ...]          # possible turns per session ...
    turns_probs: tuple[float, ...]         # ... and their shares of sessions (sum 1)
    quantile_probs: tuple[float, ...]      # probability grid of the three quantile functions below
    prompt_first_q: tuple[float, ...]      # new prompt tokens of turn 0
    prompt_later_q: tuple[float, ...]      # new prompt tokens of turns >= 1
    output_q: tuple[float, ...]            # output tokens of any turn
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    source: str = ""                       # what the spec was fitted to, for the record

    def __post_init__(self):
        _check_spec(self, "<SynthSpec>")

    @classmethod
    def default(cls) -> "SynthSpec":
        """The spec fitted to the committed ShareGPT slice (stored in traces/synth_default.yaml)."""
        return load_spec(DEFAULT_SPEC_PATH)

    def mean_turns(self) -> float:
        return float(np.dot(self.turns_values, self.turns_probs))


def _check_spec(spec: SynthSpec, path) -> None:
    def bad(key, what):
        raise KvsimError(f"{path}: {key}: {what}")

    if not (isinstance(spec.n_sessions, (int, np.integer)) and spec.n_sessions >= 1):
        bad("n_sessions", f"expected an integer >= 1, got {spec.n_sessions!r}")
    for key in ("session_rate_per_s", "think_time_mean_s", "prompt_scale", "output_scale"):
        v = getattr(spec, key)
        lowest_ok = 0.0 if key == "think_time_mean_s" else math.nextafter(0.0, 1.0)  # zero think time is a valid stress case
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lowest_ok:
            bad(key, f"expected a finite number {'>= 0' if key == 'think_time_mean_s' else '> 0'}, got {v!r}")
    if len(spec.turns_values) == 0 or len(spec.turns_values) != len(spec.turns_probs):
        bad("turns_values", "expected a non-empty list as long as turns_probs")
    if min(spec.turns_values) < 1:
        bad("turns_values", "expected integers >= 1")
    if min(spec.turns_probs) < 0 or abs(sum(spec.turns_probs) - 1.0) > 1e-6:
        bad("turns_probs", "expected shares >= 0 that sum to 1")
    qp = spec.quantile_probs
    if len(qp) < 2 or qp[0] != 0.0 or qp[-1] != 1.0 or any(b <= a for a, b in zip(qp, qp[1:])):
        bad("quantile_probs", "expected increasing probabilities from 0 to 1")
    for key in ("prompt_first_q", "prompt_later_q", "output_q"):
        q = getattr(spec, key)
        if len(q) != len(qp):
            bad(key, f"expected {len(qp)} quantiles (one per quantile_probs entry), got {len(q)}")
        if q[0] < 0 or any(b < a for a, b in zip(q, q[1:])):
            bad(key, "expected non-decreasing token counts >= 0")
        scale = spec.output_scale if key == "output_q" else spec.prompt_scale
        if not q[-1] * scale <= MAX_TOKENS:  # also catches an infinite or NaN top quantile
            bad(key, f"the longest draw would be {q[-1]} x {scale:g} = {q[-1] * scale:.4g} tokens, "
                     f"expected at most {MAX_TOKENS:,} (sim.trace.MAX_TOKENS)")


def _quantiles(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(x), 2) for x in np.quantile(values.astype(float), QUANTILE_PROBS))


def fit(df: pd.DataFrame, source: str = "") -> SynthSpec:
    """Fit a SynthSpec to a canonical multi-turn trace (see module docstring for what is fitted).

    Session rate comes from the spread of turn-0 arrivals, think time from the mean of ``think_s``;
    each falls back to 1 session/s and 60 s where the trace cannot tell (a single session, no think_s).
    """
    turns = df.groupby("session_id", sort=False)["turn"].size().to_numpy()
    values, counts = np.unique(turns, return_counts=True)
    first = df["turn"].to_numpy() == 0
    later_prompts = df.loc[~first, "prompt_tokens"].to_numpy()
    if len(later_prompts) == 0:  # single-turn trace: later turns look like first turns
        later_prompts = df.loc[first, "prompt_tokens"].to_numpy()
    arrivals = np.sort(df.loc[first, "arrival_s"].to_numpy(dtype=float))
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    rate = (len(arrivals) - 1) / span if span > 0 else 1.0
    think = df.loc[~first, "think_s"].to_numpy(dtype=float)
    think = think[~np.isnan(think)]
    return SynthSpec(
        n_sessions=int(len(turns)),
        session_rate_per_s=round(float(rate), 6),
        think_time_mean_s=round(float(think.mean()), 4) if len(think) else 60.0,
        turns_values=tuple(int(v) for v in values),
        turns_probs=tuple(float(c / counts.sum()) for c in counts),
        quantile_probs=QUANTILE_PROBS,
        prompt_first_q=_quantiles(df.loc[first, "prompt_tokens"].to_numpy()),
        prompt_later_q=_quantiles(later_prompts),
        output_q=_quantiles(df["output_tokens"].to_numpy()),
        source=source,
    )


def _sample(rng: np.random.Generator, probs: np.ndarray, q: tuple[float, ...], n: int, scale: float) -> np.ndarray:
    draws = np.interp(rng.random(n), probs, np.asarray(q, dtype=float)) * scale
    return np.maximum(np.rint(draws), 1).astype(np.int64)


def generate(spec: SynthSpec, seed: int) -> pd.DataFrame:
    """Draw ``spec.n_sessions`` sessions as canonical rows, sorted by session and turn (vectorised)."""
    rng = np.random.default_rng(seed)
    n = spec.n_sessions
    turns = rng.choice(np.asarray(spec.turns_values, dtype=np.int64), size=n, p=np.asarray(spec.turns_probs))
    arrivals = np.cumsum(rng.exponential(1.0 / spec.session_rate_per_s, size=n))
    total = int(turns.sum())
    sess = np.repeat(np.arange(n), turns)
    starts = np.cumsum(turns) - turns
    turn = np.arange(total) - np.repeat(starts, turns)
    first = turn == 0
    probs = np.asarray(spec.quantile_probs, dtype=float)
    prompt = np.where(first,
                      _sample(rng, probs, spec.prompt_first_q, total, spec.prompt_scale),
                      _sample(rng, probs, spec.prompt_later_q, total, spec.prompt_scale))
    output = _sample(rng, probs, spec.output_q, total, spec.output_scale)
    think = rng.exponential(spec.think_time_mean_s, size=total) if spec.think_time_mean_s > 0 else np.zeros(total)
    width = len(str(n - 1))
    names = np.array([f"syn{i:0{width}d}" for i in range(n)], dtype=object)
    return pd.DataFrame({
        "session_id": names[sess],
        "turn": turn.astype(np.int64),
        "arrival_s": np.where(first, arrivals[sess], np.nan),
        "think_s": np.where(first, np.nan, think),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "prefix_hashes": np.full(total, None, dtype=object),
    }, columns=COLUMNS)


def load_spec(path) -> SynthSpec:
    """Read a SynthSpec from YAML; every key is checked and errors name the file and the key."""
    path = Path(path)
    # read_yaml: a folder, a binary or parquet file, non-UTF-8 bytes or nesting deeper than the stack is one line
    raw = read_yaml(path, "synthetic-trace spec",
                    f" (build it with `kvsim trace synth --fit TRACE --save-spec {path}`)")
    if not isinstance(raw, dict):
        raise KvsimError(f"{path}: expected a mapping of SynthSpec fields")
    names = {f.name: f for f in fields(SynthSpec)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise KvsimError(f"{path}: {unknown[0]}: unknown key, expected one of {sorted(names)}")
    kwargs = {}
    for name, f in names.items():
        if name not in raw:
            if f.default is not MISSING:
                continue
            raise KvsimError(f"{path}: {name}: missing, expected a value")
        v = raw[name]
        try:
            if name in ("turns_values",):
                kwargs[name] = tuple(int(x) for x in v)
            elif name.endswith(("_probs", "_q")):
                kwargs[name] = tuple(float(x) for x in v)
            elif name == "n_sessions":
                if isinstance(v, bool) or int(v) != v:
                    raise ValueError
                kwargs[name] = int(v)
            elif name == "source":
                kwargs[name] = str(v)
            else:
                kwargs[name] = float(v)
        except (TypeError, ValueError):
            raise KvsimError(f"{path}: {name}: expected {'a list of numbers' if name.endswith(('_q', '_probs', '_values')) else 'a number'}, got {v!r}") from None
    try:
        spec = SynthSpec(**kwargs)
    except KvsimError as exc:
        raise KvsimError(str(exc).replace("<SynthSpec>", str(path))) from None
    return spec


def save_spec(spec: SynthSpec, path) -> Path:
    """Write a SynthSpec as YAML atomically."""
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    return atomic_write_text(path, "# Fitted by sim/trace_synth.py:fit; see traces/README.md\n"
                             + yaml.safe_dump(data, sort_keys=False, width=120))
