"""Results of the measurements as files: CSV tables first, then the markdown summary and plots drawn from
them, and the simulator parameters (``configs/round_attention/*.yaml``). Every file is written through
``sim.files`` (a temporary file, then one rename), so a killed run never leaves a half-written result."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from gpu.roundattn.measure import MeasureOutcome, Spread
from sim.files import atomic_write, atomic_write_text


@dataclass(frozen=True)
class RunInfo:
    command: str
    date_utc: str
    run_time_s: float
    model: str
    conversations: str  # e.g. "8 calibration + 24 held-out"

    @staticmethod
    def machine() -> str:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch CPU float32"


def write_csv(path: Path, rows: Sequence[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))
    return df


def save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    # the temporary file's name ends in .tmp, so savefig is told the format
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix[1:]))
    plt.close(fig)


def _md_table(df: pd.DataFrame, floats: str = "{:.2f}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):  # per-column types survive (iterrows would make every int a float)
        lines.append("| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def _header(title: str, info: RunInfo) -> str:
    return (f"# {title}\n\n- command: `{info.command}`\n- date (UTC): {info.date_utc}\n"
            f"- machine: {RunInfo.machine()}\n- run time: {info.run_time_s:.0f} s\n- model: {info.model}\n"
            f"- conversations: {info.conversations}\n")


def write_measurement(out: MeasureOutcome, out_dir: Path, info: RunInfo, n_layers: int) -> None:
    ws = write_csv(out_dir / "watershed.csv", out.watershed_rows)
    layers = write_csv(out_dir / "layer_similarity.csv", out.layer_rows)
    dists = write_csv(out_dir / "round_distributions.csv", out.dist_rows)
    write_csv(out_dir / "variants.csv", out.variant_rows)
    summary = write_csv(out_dir / "summary.csv", out.summary_rows)
    sp, sr = Spread.of(ws["watershed_prompt"]), Spread.of(ws["watershed_round"])
    text = _header("Round Attention on SmolLM2-135M-Instruct (ShareGPT)", info)
    text += (f"\n## Watershed\n\nSimilarity of adjacent layers' round distributions: 1 - Jensen-Shannon distance "
             f"(base 2); watershed = first layer from which every adjacent pair is >= {out.threshold}.\n\n"
             f"| queries | median | IQR | min | max |\n|---|---|---|---|---|\n"
             f"| current prompt (used to select) | {sp.median:.1f} | {sp.q25:.1f}-{sp.q75:.1f} | {sp.lo} | {sp.hi} |\n"
             f"| whole current round | {sr.median:.1f} | {sr.q25:.1f}-{sr.q75:.1f} | {sr.lo} | {sr.hi} |\n\n"
             f"Model watershed (median of the calibration conversations): layer **{out.watershed}** of {n_layers} "
             f"(layers 0..{out.watershed} keep the whole history; layers {out.watershed + 1}..{n_layers - 1} "
             f"attend to the selected rounds). top_dynNN: dynamic k, the fewest rounds "
             f"holding NN% of the watershed layer's round attention; last_dynNN: the last rounds, as many as "
             f"top_dynNN kept (equal memory).\n\n## Selections on held-out conversations\n\n")
    text += _md_table(summary) + "\n\nPer conversation: `watershed.csv`; per variant and conversation: `variants.csv`.\n"
    atomic_write_text(out_dir / "summary.md", text)
    plot_measurement(out_dir, ws, layers, dists, summary, out)


def plot_measurement(out_dir: Path, ws: pd.DataFrame, layers: pd.DataFrame, dists: pd.DataFrame,
                     summary: pd.DataFrame, out: MeasureOutcome) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # per-layer similarity, one thin line per conversation
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, which in zip(axes, ("prompt", "round")):
        d = layers[layers["queries"] == which]
        for _, g in d.groupby("conv_id"):
            ax.plot(g["layer"] + 0.5, g["js_similarity"], color="tab:blue", alpha=0.15, lw=0.8)
        med = d.groupby("layer")["js_similarity"].median()
        ax.plot(med.index + 0.5, med.values, color="black", lw=2, label="median")
        ax.axhline(out.threshold, color="red", ls="--", lw=1, label=f"threshold {out.threshold}")
        ax.axvline(out.watershed, color="green", ls=":", lw=1.5, label=f"watershed {out.watershed}")
        ax.set_xlabel("layer pair (l, l+1), plotted at l+0.5")
        ax.set_title(f"queries: {'current prompt' if which == 'prompt' else 'whole current round'}")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("1 - JS distance of round distributions")
    save_fig(fig, out_dir / "layer_similarity.png")

    # round distributions: mean over conversations by rounds-back, and four single conversations
    fig, axes = plt.subplots(1, 5, figsize=(18, 4.5))
    capped = dists.assign(back=dists["rounds_back"].clip(upper=6))
    mean = capped.groupby(["layer", "back"])["mass_prompt"].sum().unstack(fill_value=0.0)
    mean = mean.div(mean.sum(axis=1), axis=0)
    mean = mean[sorted(mean.columns, reverse=True)]  # oldest left, newest right, as in the single panels
    im = axes[0].imshow(mean.values, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
    axes[0].set_xticks(range(mean.shape[1]), [str(b) if b < 6 else "6+" for b in mean.columns])
    axes[0].set_title("all conversations (pooled)")
    for ax, cid in zip(axes[1:], list(dict.fromkeys(dists["conv_id"]))[:4]):
        g = dists[dists["conv_id"] == cid].pivot(index="layer", columns="rounds_back", values="mass_prompt")
        g = g[sorted(g.columns, reverse=True)]
        ax.imshow(g.values, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(g.shape[1]), [str(c) for c in g.columns])
        ax.set_title(cid)
    for ax in axes:
        ax.axhline(out.watershed + 0.5, color="white", ls="--", lw=1)  # layers above it are restricted
        ax.set_xlabel("rounds back from the current round")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, fraction=0.02, label="share of the prompt's attention on history rounds")
    save_fig(fig, out_dir / "round_distributions.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = range(0, int(max(ws["watershed_prompt"].max(), ws["watershed_round"].max())) + 2)
    ax.hist([ws["watershed_prompt"], ws["watershed_round"]], bins=bins, label=["prompt queries", "round queries"])
    ax.set_xlabel("watershed layer")
    ax.set_ylabel("conversations")
    ax.legend()
    save_fig(fig, out_dir / "watershed_hist.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for rule, marker in (("top", "o"), ("last", "s"), ("full", "*")):
        s = summary[summary["variant"].str.startswith(rule)]
        for ax, col in zip(axes, ("ppl_change_pct", "top1_agreement_pct")):
            ax.scatter(s["gpu_kv_saving_pct"], s[col], marker=marker, s=60,
                       label={"top": "top-k by round attention", "last": "last-k window", "full": "full"}[rule])
            for _, r in s.iterrows():
                ax.annotate(r["variant"], (r["gpu_kv_saving_pct"], r[col]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
    axes[0].set_ylabel("reply perplexity change vs full (%)")
    axes[1].set_ylabel("top-1 next-token agreement with full (%)")
    for ax in axes:
        ax.set_xlabel("GPU-resident KV saved (%)")
        ax.legend(fontsize=8)
    save_fig(fig, out_dir / "quality_vs_memory.png")


def write_sim_config(out: MeasureOutcome, path: Path, info: RunInfo, variant: str, n_layers: int,
                     model: str) -> dict:
    """Parameters for ``policy.round_attention`` of the simulator, from the measurement."""
    s = {r["variant"]: r for r in out.summary_rows}
    if variant not in s:
        raise KeyError(variant)
    chosen = s[variant]
    doc = {
        "policy": {"round_attention": {
            "enabled": True,
            # the simulator's watershed_layer counts the layers that keep the whole history: [0, w]
            "watershed_layer": out.watershed + 1,
            "kept_fraction": round(float(chosen["kept_fraction"]), 4)}},
        "measured": {
            "model": model, "n_layers": n_layers, "watershed_layer_index": out.watershed,
            "watershed_depth_fraction": round((out.watershed + 1) / n_layers, 4),
            "variant": variant, "k": "dynamic" if "dyn" in variant else int(chosen["mean_k"]),
            "mean_k": round(float(chosen["mean_k"]), 3),
            "similarity": "1 - Jensen-Shannon distance (base 2)", "threshold": out.threshold,
            "gpu_kv_saving_pct": round(float(chosen["gpu_kv_saving_pct"]), 2),
            "ppl_change_pct": round(float(chosen["ppl_change_pct"]), 3),
            "top1_agreement_pct": round(float(chosen["top1_agreement_pct"]), 2),
            "kept_fraction_by_variant": {k: round(float(v["kept_fraction"]), 4) for k, v in s.items()},
            "conversations": info.conversations, "date_utc": info.date_utc, "command": info.command},
    }
    text = ("# Round Attention parameters for the simulator, measured on a real model (gpu/roundattn).\n"
            "# policy.round_attention.watershed_layer = number of layers that keep the whole history\n"
            "# (layers [0, watershed_layer)); kept_fraction = mean share of history tokens in the rounds\n"
            "# kept above it. watershed_depth_fraction maps the watershed to models of other depth.\n")
    text += yaml.safe_dump(doc, sort_keys=False)
    atomic_write_text(path, text)
    return doc


def write_truncation(rows: Sequence[dict], summary: Sequence[dict], out_dir: Path, info: RunInfo) -> None:
    write_csv(out_dir / "truncation.csv", rows)
    sm = write_csv(out_dir / "truncation_summary.csv", summary)
    text = _header("KV truncation: reuse saved (pre-RoPE) KV at new positions vs recompute", info)
    text += ("\nHistory + current round overflow the window; the system prefix is kept and the oldest history "
             "tokens are dropped. (a) reuse: the saved pre-RoPE KV of the kept tokens, RoPE re-applied at their "
             "new positions (CachedAttention §3.4); (b) recompute: prefill of the truncated text. Reply "
             "perplexity pooled over all reply tokens; `full_history` = no truncation, for reference.\n\n")
    text += _md_table(sm) + "\n"
    atomic_write_text(out_dir / "truncation.md", text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    x = range(len(sm))
    for i, (col, label) in enumerate((("ppl_full_history", "full history (no truncation)"),
                                      ("ppl_reuse_repositioned", "(a) reuse saved KV, re-positioned"),
                                      ("ppl_recompute", "(b) recompute truncated text"))):
        ax.bar([xi + (i - 1) * width for xi in x], sm[col], width, label=label)
    ax.set_xticks(list(x), [f"window {w}" for w in sm["window_tokens"]])
    ax.set_ylabel("reply perplexity")
    ax.legend(fontsize=8)
    save_fig(fig, out_dir / "truncation.png")
