"""Figures drawn from a sweep's points.parquet: each figure appears when the sweep varies its axis.

  ttft_vs_dram / ttft_vs_ssd     TTFT p50 and p99 (ms) vs store capacity per GPU (CachedAttention Fig. 12-style)
  hit_rate_vs_dram / _vs_ssd     share of turns served from HBM, DRAM, SSD or recomputed, vs capacity
  prefill_vs_rate                prefill throughput (tokens/s) vs session arrival rate
  cost_per_config                $ per 1,000 turns for every configuration of the sweep
  ablation                       TTFT and prefill throughput per named variant (layer-wise preload, ...)
  eviction                       hit rate and TTFT per eviction policy (scheduler-aware, LRU, FIFO)

Points that share everything but the seed are averaged; where a configuration ran several seeds,
its error bars span their min..max (the title says how many seeds; a single seed draws no bars).
A configuration with a failed or unfinished point has no value: its line breaks there, an x at the
foot of the axes marks it, and its bar is labelled "no result" rather than left blank.  Capacity and
rate ladders that grow geometrically (8-256 GB, 0-2.5 TB) are drawn on log axes (symlog when 0 is
among them), ticked at the values the sweep ran.
Every figure is written as PNG and PDF under <sweep>/plots/.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from sim.errors import KvsimError  # noqa: E402
from sim.files import atomic_write  # noqa: E402
from sim.sweep import POINTS_FILE, read_points  # noqa: E402
from sim.units import GB  # noqa: E402

NO_RESULT = "no result (failed or not run)"
TIERS = [("hit_rate_hbm", "HBM"), ("hit_rate_dram", "DRAM"), ("hit_rate_ssd", "SSD"), ("miss_rate", "recomputed")]
PRETTY = {"policy.kind": "policy", "policy.eviction": "eviction", "host.dram_bytes": "DRAM",
          "ssd.bytes": "SSD", "gpu.count": "GPUs", "gpu.name": "GPU", "workload.session_rate_per_s": "rate"}


def param_columns(df: pd.DataFrame) -> list[str]:
    """Columns that describe a point's configuration (dotted config keys, model, variant), not results."""
    cols = [c for c in df.columns if ("." in c and not c.startswith("summary.")) or c in ("model", "variant")]
    return [c for c in cols if c != "seed"]


def varying(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    return [c for c in param_columns(df) if c not in exclude and df[c].nunique(dropna=True) > 1]


def series_for(df: pd.DataFrame, x: str) -> list[str]:
    """Columns that split the points into lines (or bar groups) along `x`: those that vary, minus
    those that `x` already determines (a zip such as model -> gpu.count, a variant -> its switches)."""
    keyed = df[x].astype(str)
    return [c for c in varying(df, exclude=(x,))
            if (df[c].astype(str).groupby(keyed).nunique() > 1).any()]


def label_columns(df: pd.DataFrame) -> list[str]:
    """The fewest varying columns that still tell every configuration apart: a column that another
    varying column determines (gpu.count by model, a switch by its variant) is left out."""
    cols = varying(df)

    def determines(a: str, b: str) -> bool:
        return not (df[b].astype(str).groupby(df[a].astype(str)).nunique() > 1).any()

    keep = []
    for c in cols:
        if any(determines(d, c) and (not determines(c, d) or cols.index(d) < cols.index(c)) for d in cols if d != c):
            continue
        keep.append(c)
    return keep


def _sweeps_x(df: pd.DataFrame, x: str) -> bool:
    """True when some line would have two or more x values: x is really an axis, not a label that
    rides along with another axis (as DRAM rides along with the model in paper/models)."""
    if x not in df or df[x].nunique() < 2:
        return False
    series = series_for(df, x)
    if not series:
        return True
    return bool((df.groupby([df[c].astype(str) for c in series])[x].nunique() > 1).any())


def _fmt(col: str, v) -> str:
    if col in ("host.dram_bytes", "ssd.bytes") and isinstance(v, (int, float)):
        return f"{PRETTY[col]} {v / GB:g} GB"
    name = PRETTY.get(col, col.split(".")[-1])
    return f"{v}" if col in ("model", "variant", "policy.kind") else f"{name}={v}"


def _label(row: pd.Series | dict, cols: list[str]) -> str:
    return ", ".join(_fmt(c, row[c]) for c in cols) or "all"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"].copy() if "status" in df else df.copy()


def _failed(df: pd.DataFrame) -> pd.Series:
    """True for the rows without a result (failed, or not run yet)."""
    return df["status"] != "ok" if "status" in df else pd.Series(False, index=df.index)


def _seeds(df: pd.DataFrame) -> int:
    """Most seeds any configuration of the table ran (1 when the table has no seed column)."""
    if "seed" not in df or df.empty:
        return 1
    keys = [c for c in param_columns(df) if c in df]
    if not keys:
        return int(df["seed"].nunique())
    return int(df.groupby([df[k].astype(str) for k in keys], dropna=False)["seed"].nunique().max())


def _per_gpu(df: pd.DataFrame, col: str) -> pd.Series:
    gpus = df["gpu.count"].fillna(1) if "gpu.count" in df else 1
    return df[col].astype(float) / GB / gpus


def _seed_mean(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, min and max of each metric over seeds for every distinct configuration in `keys`; a
    configuration with any point lacking a result gets NaN (a mean over the surviving seeds would pass
    for the whole set) and `_failed` True; `_n` counts its seeds."""
    df = df.assign(_failed=_failed(df))
    g = df.groupby(keys, dropna=False, sort=True)
    vals = g[metrics]
    out = pd.concat([vals.mean(), vals.min().add_suffix("_min"), vals.max().add_suffix("_max"),
                     g["_failed"].any(), g.size().rename("_n")], axis=1)
    cols = metrics + [f"{m}_min" for m in metrics] + [f"{m}_max" for m in metrics]
    out.loc[out["_failed"], cols] = np.nan
    return out.reset_index()


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    fig.tight_layout()
    paths = [atomic_write(out_dir / f"{name}.{ext}",
                          lambda p, ext=ext: fig.savefig(p, format=ext, dpi=130, bbox_inches="tight"))
             for ext in ("png", "pdf")]
    plt.close(fig)
    return paths


def _mark_no_result(ax, xs, color) -> None:
    """An x at the foot of the axes at each x without a result (the value is unknown, so no y)."""
    if len(xs):
        ax.plot(list(xs), [0.02] * len(xs), "x", color=color, ms=8, mew=2, clip_on=False,
                transform=blended_transform_factory(ax.transData, ax.transAxes))


def _lines(ax, df: pd.DataFrame, x: str, y: str, series: list[str], scale: float = 1.0, style: str = "-o",
           suffix: str = "") -> None:
    """One line per series, mean over seeds; a configuration without a result breaks its line and is
    marked with an x."""
    agg = _seed_mean(df, series + [x], [y])
    groups = agg.groupby(series, dropna=False, sort=True) if series else [((), agg)]
    any_failed = False
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        label = _label(dict(zip(series, key)), series) + suffix
        color = f"C{i % 10}"
        several = (g["_n"] > 1) & ~g["_failed"]
        yerr = ([((g[y] - g[f"{y}_min"]) * scale).where(several, 0).clip(lower=0),
                 ((g[f"{y}_max"] - g[y]) * scale).where(several, 0).clip(lower=0)]
                if several.any() else None)
        ax.errorbar(g[x], g[y] * scale, yerr=yerr, fmt=style, capsize=2, label=label, markersize=4, color=color)
        _mark_no_result(ax, g.loc[g["_failed"], x], color)
        any_failed |= bool(g["_failed"].any())
    if any_failed:
        ax.plot([], [], "x", color="k", ms=8, mew=2, label=NO_RESULT)
    _scale_axis(ax, agg[x])


def _geometric(values) -> bool:
    """True when the positive values span 8x or more and grow by a roughly constant factor (a doubling
    ladder), not by a constant step."""
    v = np.unique(np.asarray([float(x) for x in values if pd.notna(x)], dtype=float))
    pos = v[v > 0]
    if len(pos) < 3 or pos[-1] / pos[0] < 8:
        return False
    return float(np.median(pos[1:] / pos[:-1])) >= 1.5


def _scale_axis(ax, values, axis: str = "x") -> None:
    """Log scale for a geometric ladder (symlog, linear below its smallest positive value, when it has 0),
    ticked at the ladder's own values."""
    if not _geometric(values):
        return
    v = np.unique(np.asarray([float(x) for x in values if pd.notna(x)], dtype=float))
    pos = v[v > 0]
    set_scale, set_ticks = (ax.set_xscale, ax.set_xticks) if axis == "x" else (ax.set_yscale, ax.set_yticks)
    if (v <= 0).any():
        set_scale("symlog", linthresh=float(pos[0]))
    else:
        set_scale("log")
    set_ticks(v, [f"{x:g}" for x in v])
    (ax.xaxis if axis == "x" else ax.yaxis).set_minor_locator(NullLocator())


def _title(df: pd.DataFrame, what: str) -> str:
    fixed = [c for c in ("model", "gpu.name") if c in df and df[c].nunique() == 1]
    suffix = " — " + ", ".join(str(df[c].iloc[0]) for c in fixed) if fixed else ""
    sweep = f" [{df['sweep'].iloc[0]}]" if "sweep" in df and len(df) else ""
    n = _seeds(df)
    seeds = f"\nmean of {n} seeds, bars min–max" if n > 1 else ""
    return f"{what}{suffix}{sweep}{seeds}"


# ---------------------------------------------------------------- the figures

def plot_ttft_vs_capacity(df: pd.DataFrame, out_dir: Path, cap: str) -> list[Path]:
    if not _sweeps_x(df, cap) or "ttft_p99_s" not in df or df["ttft_p99_s"].isna().all():
        return []
    tier = PRETTY[cap]
    series = series_for(df, cap)
    df = df.assign(_x=_per_gpu(df, cap))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, (metric, name) in zip(axes, [("ttft_p50_s", "p50"), ("ttft_p99_s", "p99")]):
        _lines(ax, df, "_x", metric, series, scale=1e3)
        ax.set_xlabel(f"{tier} capacity per GPU (GB)")
        ax.set_ylabel(f"TTFT {name} (ms)")
        ax.set_title(f"TTFT {name}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(_title(df, f"Time to first token vs {tier} capacity per GPU"))
    return _save(fig, out_dir, f"ttft_vs_{'dram' if cap == 'host.dram_bytes' else 'ssd'}")


def plot_hit_rate_vs_capacity(df: pd.DataFrame, out_dir: Path, cap: str) -> list[Path]:
    tiers = [(m, n) for m, n in TIERS if m in df]
    if not _sweeps_x(df, cap) or not tiers:
        return []
    tier = PRETTY[cap]
    series = series_for(df, cap)
    df = df.assign(_x=_per_gpu(df, cap))
    fig, axes = plt.subplots(1, len(tiers), figsize=(3.6 * len(tiers), 3.6), sharex=True, sharey=True)
    for ax, (metric, name) in zip(axes, tiers):
        _lines(ax, df, "_x", metric, series, scale=100.0)
        ax.set_title(f"served from {name}" if name != "recomputed" else "recomputed (miss)")
        ax.set_xlabel(f"{tier} capacity per GPU (GB)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of turns' history (%)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(_title(df, f"KV-cache hit rate per tier vs {tier} capacity per GPU"))
    return _save(fig, out_dir, f"hit_rate_vs_{'dram' if cap == 'host.dram_bytes' else 'ssd'}")


def plot_prefill_vs_rate(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    x = "workload.session_rate_per_s"
    if not _sweeps_x(df, x) or "prefill_tokens_per_s" not in df:
        return []
    series = series_for(df, x)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, df, x, "prefill_tokens_per_s", series)
    ax.set_xlabel("session arrival rate (sessions/s)")
    ax.set_ylabel("prefill throughput (tokens/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(df, "Prefill throughput vs session arrival rate"))
    return _save(fig, out_dir, "prefill_vs_rate")


def _bar_errors(g: pd.DataFrame, m: str, scale: float = 1.0):
    """min..max error bars of metric m where a configuration ran several seeds; None when none did."""
    several = (g["_n"] > 1) & ~g["_failed"]
    if not several.any():
        return None
    # clipped at 0: the mean of equal values can round an ulp past them
    return [((g[m] - g[f"{m}_min"]) * scale).where(several, 0).fillna(0).clip(lower=0),
            ((g[f"{m}_max"] - g[m]) * scale).where(several, 0).fillna(0).clip(lower=0)]


def _label_no_result(ax, xs, failed) -> None:
    """Write "no result" where a bar is missing because its configuration failed, so a gap is explained."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for x, f in zip(xs, failed):
        if f:
            ax.text(x, 0.02, "no result", rotation=90, ha="center", va="bottom", fontsize=7, color="C3",
                    transform=trans)


def _bars(ax, labels: list[str], agg: pd.DataFrame, m: str, color=None) -> None:
    xs = list(range(len(labels)))
    ax.bar(xs, agg[m].fillna(0), yerr=_bar_errors(agg, m), capsize=2, color=color)
    _label_no_result(ax, xs, agg["_failed"])
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_cost_per_config(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    if "cost_per_1k_turns_usd" not in df:
        return []
    series = label_columns(df)
    agg = _seed_mean(df, series, ["cost_per_1k_turns_usd"]) if series else _seed_mean(
        df.assign(_all="all"), ["_all"], ["cost_per_1k_turns_usd"])
    labels = [_label(r, series) for _, r in agg.iterrows()]
    m = "cost_per_1k_turns_usd"
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(labels) + 2), 4.2))
    # one colour per value of the first label column (e.g. the policy), so families read at a glance
    first = agg[series[0]].astype(str) if series else pd.Series(["all"] * len(agg))
    palette = {v: f"C{i % 10}" for i, v in enumerate(dict.fromkeys(first))}
    _bars(ax, labels, agg, m, color=[palette[v] for v in first])
    ax.set_ylabel("cost per 1,000 turns (USD)")
    ax.set_title(_title(df, "Serving cost per 1,000 turns by configuration"))
    return _save(fig, out_dir, "cost_per_config")


def _grouped_panels(df: pd.DataFrame, by: str, out_dir: Path, name: str, what: str) -> list[Path]:
    metrics = [(m, lab, s) for m, lab, s in [("ttft_mean_s", "TTFT mean (ms)", 1e3), ("ttft_p99_s", "TTFT p99 (ms)", 1e3),
                                             ("prefill_tokens_per_s", "prefill throughput (tokens/s)", 1.0),
                                             ("miss_rate", "recomputed share (%)", 100.0),
                                             ("cost_per_1k_turns_usd", "$ per 1,000 turns", 1.0)] if m in df]
    series = series_for(df, by)
    keys = series + [by]
    agg = _seed_mean(df, keys, [m for m, _, _ in metrics])
    order = list(dict.fromkeys(df[by]))  # the spec's order, e.g. the full system first
    groups = list(agg.groupby(series, dropna=False, sort=True)) if series else [((), agg)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 4))
    axes = axes if len(metrics) > 1 else [axes]
    width = 0.8 / len(groups)
    for ax, (m, lab, s) in zip(axes, metrics):
        for gi, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            g = g.set_index(by).reindex(order)
            g["_failed"] = g["_failed"].fillna(False).astype(bool)
            g["_n"] = g["_n"].fillna(0)
            xs = [i + (gi - (len(groups) - 1) / 2) * width for i in range(len(order))]
            ax.bar(xs, (g[m] * s).fillna(0), width, yerr=_bar_errors(g, m, s), capsize=2,
                   label=_label(dict(zip(series, key)), series) if series else None)
            _label_no_result(ax, xs, g["_failed"])
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([str(o) for o in order], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(lab)
        ax.grid(axis="y", alpha=0.3)
    if series:
        axes[-1].legend(fontsize=7)
    fig.suptitle(_title(df, what))
    fig.tight_layout()
    return _save(fig, out_dir, name)


def plot_policy_by_model(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The headline comparison: each policy's TTFT, prefill throughput and reuse, model by model."""
    if "model" not in df or df["model"].nunique() < 2 or "policy.kind" not in df or df["policy.kind"].nunique() < 2:
        return []
    return _grouped_panels(df, "model", out_dir, "policy_by_model", "Recompute vs KV reuse, per model")


def plot_ablation(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    if "variant" not in df or df["variant"].nunique() < 2:
        return []
    return _grouped_panels(df, "variant", out_dir, "ablation", "Ablation: each mechanism switched off in turn")


def plot_eviction(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    if "policy.eviction" not in df or "policy.eviction" not in label_columns(df):
        return []  # eviction varies only as part of named variants: the ablation figure shows it
    return _grouped_panels(df, "policy.eviction", out_dir, "eviction", "Eviction policies compared")


FIGURES: list[Callable[[pd.DataFrame, Path], list[Path]]] = [
    lambda df, o: plot_ttft_vs_capacity(df, o, "host.dram_bytes"),
    lambda df, o: plot_ttft_vs_capacity(df, o, "ssd.bytes"),
    lambda df, o: plot_hit_rate_vs_capacity(df, o, "host.dram_bytes"),
    lambda df, o: plot_hit_rate_vs_capacity(df, o, "ssd.bytes"),
    plot_prefill_vs_rate,
    plot_cost_per_config,
    plot_ablation,
    plot_eviction,
    plot_policy_by_model,
]


def plot_points(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure the table supports, into out_dir; an empty list when no point succeeded. Points
    without a result stay in the table, so the figures can mark them."""
    if _ok(df).empty:
        return []
    paths: list[Path] = []
    for fig in FIGURES:
        paths += fig(df, out_dir)
    return paths


def sweep_dirs(root: Path) -> list[Path]:
    """`root` itself when it holds points.parquet, else every sweep directory below it."""
    root = Path(root)
    if (root / POINTS_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise KvsimError(f"{root}: not a directory")
    found = sorted(p.parent for p in root.rglob(POINTS_FILE))
    if not found:
        raise KvsimError(f"{root}: no {POINTS_FILE} here or below; run `kvsim sweep <spec>` first")
    return found


def plot_sweep(root: Path) -> list[Path]:
    """Draw the figures of every sweep at or under `root` into <sweep>/plots/."""
    paths: list[Path] = []
    for d in sweep_dirs(root):
        paths += plot_points(read_points(d), d / "plots")
    return paths
