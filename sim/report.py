"""results/paper/REPORT.md: the CachedAttention reproduction, generated from the sweeps' result files.

`kvsim sweep configs/paper/sweeps` writes results/paper/<part>/points.parquet for the parts below;
`kvsim report results/paper` draws their figures and writes the report: the set-up, the headline
numbers next to the paper's claims (abstract and Sec. 5 of arXiv 2403.19708: TTFT up to -87%,
prefill throughput up to 7.8x, end-to-end cost up to -70%), one section per figure, and an
account of every difference between this simulation and the paper's testbed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sim.errors import KvsimError
from sim.files import atomic_write_text
from sim.units import GB, TB
from sim.sweep import POINTS_FILE, prepare_out_dir, read_points, read_run_log

PARTS = ("models", "rate", "dram", "ssd", "ablation", "eviction", "scheduler")


@dataclass(frozen=True)
class Claim:
    what: str
    paper: str
    paper_value: float
    metric: str
    kind: str  # "reduction": 1 - new/old is the gain; "ratio": new/old is the gain

    def gain(self, new: float, old: float) -> float:
        if not old:
            return float("nan")
        return 1.0 - new / old if self.kind == "reduction" else new / old

    def fmt(self, g: float) -> str:
        if g != g:
            return "n/a"
        return f"−{g:.0%}" if self.kind == "reduction" and g >= 0 else (f"+{-g:.0%}" if self.kind == "reduction"
                                                                        else f"{g:.2f}×")


CLAIMS = (
    Claim("TTFT (mean), vs recompute", "up to −87%", 0.87, "ttft_mean_s", "reduction"),
    Claim("prefill throughput, vs recompute", "up to 7.8×", 7.8, "prefill_tokens_per_s", "ratio"),
    Claim("cost per 1,000 turns, vs recompute", "up to −70%", 0.70, "cost_per_1k_turns_usd", "reduction"),
)


def load_parts(root: Path) -> dict[str, pd.DataFrame]:
    """Each part's successful points, averaged over seeds (tables quote means, never a lucky seed)."""
    parts = {}
    for p in PARTS:
        if (root / p / POINTS_FILE).is_file():
            df = read_points(root / p)
            parts[p] = seed_mean(df[df["status"] == "ok"])
    return parts


def seed_mean(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of every numeric result over the seeds of each configuration; `seeds` counts them."""
    from sim.plot import param_columns

    keys = [c for c in param_columns(df) if c != "seed"]
    num = [c for c in df.columns if c not in keys and c not in ("seed", "point", "wall_s")
           and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    g = df.groupby([df[k].astype(str) if df[k].dtype == object else df[k] for k in keys], dropna=False, sort=False)
    out = g[num].mean()
    out["seeds"] = g.size()
    out = out.reset_index()
    return out


def _paired(df: pd.DataFrame, by: list[str], base: str = "recompute", new: str = "attentionstore") -> pd.DataFrame:
    """One row per configuration `by` with the recompute and AttentionStore summaries side by side."""
    keys = by
    a = df[df["policy.kind"] == new].set_index(keys)
    b = df[df["policy.kind"] == base].set_index(keys)
    common = a.index.intersection(b.index)
    return a.loc[common].merge(b.loc[common], left_index=True, right_index=True, suffixes=("", "_re")).reset_index()


def _gains(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    p = _paired(df, by)
    for c in CLAIMS:
        p[f"gain:{c.metric}"] = [c.gain(n, o) for n, o in zip(p[c.metric], p[f"{c.metric}_re"])]
    return p


def best_gains(parts: dict[str, pd.DataFrame]) -> list[tuple[float, str]]:
    """For each claim, kvsim's best gain over the models of paper/models and the rates of paper/rate."""
    out = []
    g = _gains(parts["models"], ["model"])
    r = parts.get("rate")
    gr = _gains(r, ["workload.session_rate_per_s"]) if r is not None and not r.empty else None
    for c in CLAIMS:
        col = f"gain:{c.metric}"
        best = g.loc[g[col].idxmax()]
        val, where = best[col], f"{best['model']}"
        if gr is not None and len(gr) and gr[col].max() > val:
            b2 = gr.loc[gr[col].idxmax()]
            val, where = b2[col], f"{b2['model']} at {b2['workload.session_rate_per_s']:g} sessions/s"
        out.append((float(val), where))
    return out


def _verdict(c: Claim, val: float) -> str:
    if val > c.paper_value * 1.05:
        return "exceeded (see Differences)"
    if val >= c.paper_value * 0.9:
        return "reproduced"
    return "same direction, smaller" if (val > 0 if c.kind == "reduction" else val > 1) else "NOT reproduced"


def _ms(x: float) -> str:
    return f"{1e3 * x:,.0f} ms" if x == x else "n/a"


def _gb(x: float) -> str:
    return f"{x / GB:,.0f} GB" if x < TB else f"{x / TB:g} TB"


def _img(root: Path, part: str, name: str) -> str:
    f = root / part / "plots" / f"{name}.png"
    return f"![{part}: {name}]({part}/plots/{name}.png)\n" if f.is_file() else f"_(figure {part}/{name} not drawn)_\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _wall_times(root: Path) -> tuple[list[list[str]], float, int | None]:
    rows, total, cores = [], 0.0, None
    for p in PARTS:
        runs = read_run_log(root / p)
        if not runs:
            continue
        full = [r for r in runs if r.get("ran") == r.get("total")]  # a run that computed every point
        r = full[-1] if full else runs[-1]
        cores = r.get("cpu_count", cores)
        total += r["wall_s"]
        rows.append([f"paper/{p}", str(r.get("total")), str(r.get("ran")), f"{r['wall_s']:.1f} s", str(r.get("jobs")),
                     str(r.get("cpu_count")), str(r.get("backend")), f"`{r.get('code', 'unknown')}`"])
    return rows, total, cores


def write_report(root, draw: bool = True) -> Path:
    """Draw the figures (unless draw=False) and write <root>/REPORT.md; returns its path. Every folder it
    writes into is checked before the first file is written."""
    root = Path(root)
    parts = load_parts(root)
    if not parts:
        raise KvsimError(f"{root}: no paper sweep results ({', '.join(PARTS)}); "
                         f"run `kvsim sweep configs/paper/sweeps` first")
    if (root / "REPORT.md").is_dir():
        raise KvsimError(f"{root / 'REPORT.md'}: is a folder; expected the report file (or nothing) there")
    prepare_out_dir(root, "kvsim report:")
    if draw:
        from sim.plot import plot_sweep

        for p in parts:
            prepare_out_dir(root / p / "plots", "kvsim report:")
        for p in parts:
            plot_sweep(root / p)
    out = root / "REPORT.md"
    atomic_write_text(out, render_report(root, parts))
    return out


def render_report(root, parts: dict[str, pd.DataFrame] | None = None) -> str:
    """The text of REPORT.md for the results under `root`, written nowhere (a test compares it with
    the committed file)."""
    root = Path(root)
    return _render(root, load_parts(root) if parts is None else parts)


def _render(root: Path, parts: dict[str, pd.DataFrame]) -> str:
    base_cfg = _base_config(root)
    s = ["# CachedAttention reproduction with kvsim\n",
         "Generated by `kvsim report results/paper` from the result files of "
         "`kvsim sweep configs/paper/sweeps` (do not edit by hand). Paper: Gao et al., *Cost-Efficient Large "
         "Language Model Serving for Multi-turn Conversations with CachedAttention*, USENIX ATC'24, "
         "arXiv 2403.19708. Every number below is **simulated** by kvsim's roofline cost model; none "
         "was measured on a GPU.\n"]
    s += _setup_section(root, parts, base_cfg)
    s += _headline_section(root, parts)
    s += _figure_sections(root, parts)
    s += _scheduler_section(parts)
    s += _differences_section(parts, base_cfg)
    return "\n".join(s)


def _base_config(root: Path) -> dict:
    """The resolved base config the paper sweeps share, read from the path their sweep.json records."""
    from sim.config import config_to_dict, load_config

    for part in PARTS:
        manifest = root / part / "sweep.json"
        if manifest.is_file():
            base = json.loads(manifest.read_text()).get("base")
            if not base:
                continue
            # recorded relative to where the sweep ran (the checkout's root, as a rule): look there too
            found = [c for c in (Path(base), *(a / base for a in root.resolve().parents)) if c.is_file()]
            try:
                return config_to_dict(load_config(found[0] if found else base))
            except KvsimError:
                continue  # the base config moved or changed shape since the sweep ran
    return {}


def _setup_section(root: Path, parts: dict[str, pd.DataFrame], cfg: dict) -> list[str]:
    s = ["## Set-up\n"]
    s.append("Configs: `configs/paper/base.yaml` (each value marked [paper] or [assumed]; sources in "
             "`configs/paper/README.md`) and one sweep spec per part in `configs/paper/sweeps/`.\n")
    if cfg:
        wl, pr = cfg.get("workload", {}), cfg.get("prices", {})
        trace = Path(wl.get("trace") or "synthetic").name
        m = parts.get("models")
        turns = f"{int(m['turns'].iloc[0]):,} turns of {int(m['sessions'].iloc[0]):,} sessions" if m is not None and len(m) else ""
        rows = [["workload", f"`{trace}`, first {wl.get('max_sessions')} sessions ({turns}), Poisson session "
                             f"arrivals at {wl.get('session_rate_per_s')}/s, the trace's think times"],
                ["GPU", f"{cfg['gpu']['name']} (roofline: peak × MFU {cfg['gpu']['prefill_mfu']}, "
                        f"HBM bandwidth × MBU {cfg['gpu']['decode_mbu']})"
                        # a config resolved before gpu.efficiency existed ran the constant roofline
                        if cfg["gpu"].get("efficiency", "constant") == "constant" else
                        f"{cfg['gpu']['name']} (roofline: each kernel at its share of peak FLOP/s and HBM "
                        f"bandwidth measured on an H100, sim/efficiency.py)"],
                ["store per GPU", f"DRAM {_gb(cfg['host']['dram_bytes'])}, SSD {_gb(cfg['ssd']['bytes'])}; "
                                  f"PCIe {cfg['host']['h2d_gbps']} GB/s, SSD read/write "
                                  f"{cfg['ssd']['read_gbps']}/{cfg['ssd']['write_gbps']} GB/s"],
                ["prices", f"GPU ${pr.get('gpu_per_hour_usd')}/h, DRAM ${pr.get('dram_per_gb_hour_usd')}/GB·h, "
                           f"SSD ${pr.get('ssd_per_gb_hour_usd')}/GB·h"]]
        if m is not None and len(m):
            mm = m.drop_duplicates("model")
            rows.append(["models (GPUs, DRAM, SSD per replica)",
                         "; ".join(f"{r['model']} ({int(r['gpu.count'])}, {_gb(r['host.dram_bytes'])}, "
                                   f"{_gb(r['ssd.bytes'])})" for _, r in mm.iterrows())])
        s.append(_table(["", "value"], rows))
    rows, total, cores = _wall_times(root)
    if rows:
        s.append(f"Wall time of the sweeps (each part's last complete run; {cores} CPU cores here): "
                 f"**{total:.0f} s in total**.\n")
        s.append(_table(["sweep", "points", "ran", "wall", "jobs", "cores", "backend", "simulator commit"], rows))
    return s


def _headline_section(root: Path, parts: dict[str, pd.DataFrame]) -> list[str]:
    s = ["## Headline numbers beside the paper's claims\n"]
    m = parts.get("models")
    if m is None or m.empty:
        return s + ["_paper/models was not run._\n"]
    g = _gains(m, ["model"])
    rows = []
    for c, (val, where) in zip(CLAIMS, best_gains(parts)):
        col = f"gain:{c.metric}"
        rng = f"{c.fmt(g[col].min())} … {c.fmt(g[col].max())}"
        rows.append([c.what, c.paper, f"**{c.fmt(val)}** ({where})", rng, _verdict(c, val)])
    s.append(_table(["claim", "paper", "kvsim, best", "kvsim, range over models", "verdict"], rows))
    s.append("\"Best\" is the maximum over the models of `paper/models` and the arrival rates of "
             "`paper/rate`, as the paper's \"up to\" is a maximum over its models and settings.\n")
    rows = []
    for _, x in g.sort_values("model").iterrows():
        rows.append([x["model"], str(int(x["gpu.count"])), _ms(x["ttft_mean_s_re"]), _ms(x["ttft_mean_s"]),
                     CLAIMS[0].fmt(x[f"gain:{CLAIMS[0].metric}"]), _ms(x["ttft_p99_s_re"]), _ms(x["ttft_p99_s"]),
                     f"{x['prefill_tokens_per_s_re']:,.0f} → {x['prefill_tokens_per_s']:,.0f}",
                     CLAIMS[1].fmt(x[f"gain:{CLAIMS[1].metric}"]),
                     f"${x['cost_per_1k_turns_usd_re']:.3f} → ${x['cost_per_1k_turns_usd']:.3f}",
                     CLAIMS[2].fmt(x[f"gain:{CLAIMS[2].metric}"]), f"{x['reused_token_fraction']:.0%}"])
    s.append("Per model (recompute → AttentionStore):\n")
    s.append(_table(["model", "GPUs", "TTFT mean RE", "TTFT mean AS", "Δ", "p99 RE", "p99 AS",
                     "prefill tok/s", "×", "$ / 1k turns", "Δ", "context reused"], rows))
    s.append(_img(root, "models", "policy_by_model"))
    s.append(_img(root, "models", "cost_per_config"))
    return s


def _figure_sections(root: Path, parts: dict[str, pd.DataFrame]) -> list[str]:
    s = []
    if "rate" in parts:
        r = _gains(parts["rate"], ["workload.session_rate_per_s"]).sort_values("workload.session_rate_per_s")
        s.append("## Prefill throughput vs session arrival rate\n")
        s.append(_table(["sessions/s", "prefill tok/s RE", "prefill tok/s AS", "×", "TTFT mean RE", "TTFT mean AS"],
                        [[f"{x['workload.session_rate_per_s']:g}", f"{x['prefill_tokens_per_s_re']:,.0f}",
                          f"{x['prefill_tokens_per_s']:,.0f}", CLAIMS[1].fmt(x[f"gain:{CLAIMS[1].metric}"]),
                          _ms(x["ttft_mean_s_re"]), _ms(x["ttft_mean_s"])] for _, x in r.iterrows()]))
        s.append(_img(root, "rate", "prefill_vs_rate"))
    for part, cap, label in (("dram", "host.dram_bytes", "DRAM"), ("ssd", "ssd.bytes", "SSD")):
        if part not in parts:
            continue
        d = parts[part]
        s.append(f"## TTFT and hit rate vs {label} capacity per GPU\n")
        other = "ssd.bytes" if cap == "host.dram_bytes" else "host.dram_bytes"
        rows = []
        for _, x in d.sort_values([other, cap]).iterrows():
            rows.append([_gb(x[cap] / x["gpu.count"]), _gb(x[other]), _ms(x["ttft_p50_s"]), _ms(x["ttft_p99_s"]),
                         f"{x['hit_rate_hbm']:.0%}", f"{x['hit_rate_dram']:.0%}", f"{x['hit_rate_ssd']:.0%}",
                         f"{x['miss_rate']:.0%}"])
        s.append(_table([f"{label} / GPU", "other tier", "TTFT p50", "TTFT p99", "hit HBM", "hit DRAM", "hit SSD",
                         "recomputed"], rows))
        s.append("Hit rates are shares of the turns that had history to reuse.\n")
        s.append(_img(root, part, f"ttft_vs_{part}"))
        s.append(_img(root, part, f"hit_rate_vs_{part}"))
    if "ablation" in parts:
        a = parts["ablation"].set_index("variant")
        if "full" in a.index:
            f = a.loc["full"]
            rows = []
            for v, x in a.iterrows():
                rows.append([v, _ms(x["ttft_mean_s"]), f"{x['ttft_mean_s'] / f['ttft_mean_s'] - 1:+.0%}",
                             _ms(x["ttft_p99_s"]), f"{x['prefill_tokens_per_s']:,.0f}",
                             f"{x['prefill_tokens_per_s'] / f['prefill_tokens_per_s']:.2f}×", f"{x['miss_rate']:.0%}",
                             f"${x['cost_per_1k_turns_usd']:.3f}"])
            s.append("## Ablation: each mechanism switched off in turn\n")
            s.append(_table(["variant", "TTFT mean", "vs full", "TTFT p99", "prefill tok/s", "vs full",
                             "recomputed", "$ / 1k turns"], rows))
            s.append(_img(root, "ablation", "ablation"))
    if "eviction" in parts:
        e = parts["eviction"]
        piv = e.pivot_table(index="host.dram_bytes", columns="policy.eviction",
                            values=["hit_rate_dram", "miss_rate", "ttft_mean_s"])
        pols = [p for p in ("scheduler_aware", "lru", "fifo") if p in e["policy.eviction"].unique()]
        rows = [[_gb(d)] + [f"{piv.loc[d, ('hit_rate_dram', p)]:.0%} / {piv.loc[d, ('miss_rate', p)]:.1%} / "
                            f"{_ms(piv.loc[d, ('ttft_mean_s', p)])}" for p in pols] for d in piv.index]
        s.append("## Eviction policies compared\n")
        s.append("Cell: served from DRAM / recomputed (shares of the turns with history to reuse) / TTFT mean. "
                 "The SSD behind DRAM catches most of what DRAM evicts, so the policies differ mainly in how "
                 "often a turn has to wait for its history to come up from SSD.\n")
        s.append(_table(["DRAM / GPU"] + pols, rows))
        s.append(_img(root, "eviction", "eviction"))
    return s


def _scheduler_section(parts: dict[str, pd.DataFrame]) -> list[str]:
    """The paper's engine beside a chunked-prefill one (paper/scheduler): TTFT, TPOT, ITL per policy."""
    d = parts.get("scheduler")
    if d is None or d.empty:
        return []
    s = ["## The same workload under a chunked-prefill engine\n",
         "The reproduction above runs the engine the paper was built on (`scheduler.kind: prefill_first`: a "
         "prefill iteration pauses every decode, each turn holds HBM for its whole context and reply). "
         "`chunked` is vLLM V1's scheduler (one token budget per step shared by decodes and prefill chunks, "
         "paged KV allocated as tokens come, freed blocks kept as a prefix cache, recompute preemption), "
         "kvsim's default. Same trace, model and GPU; mean over the seeds.\n"]
    rows = []
    order = {"prefill_first": 0, "chunked": 1}
    pol = {"recompute": 0, "hbm_prefix": 1, "attentionstore": 2}
    d = d.sort_values(["workload.session_rate_per_s", "policy.kind", "scheduler.kind"],
                      key=lambda c: c.map(pol) if c.name == "policy.kind" else
                      c.map(order) if c.name == "scheduler.kind" else c)
    for _, x in d.iterrows():
        rows.append([f"{x['workload.session_rate_per_s']:g}", x["policy.kind"], x["scheduler.kind"],
                     _ms(x["ttft_mean_s"]), _ms(x["ttft_p99_s"]), _ms(x["tpot_mean_s"]), _ms(x["tpot_p99_s"]),
                     _ms(x["itl_p99_s"]), f"{x['hit_rate_hbm']:.0%}", f"{x['hit_rate_dram'] + x['hit_rate_ssd']:.0%}",
                     f"{x['preemptions']:.1f}"])
    s.append(_table(["sessions/s", "policy", "scheduler", "TTFT mean", "TTFT p99", "TPOT mean", "TPOT p99",
                     "ITL p99", "hit HBM", "hit host", "preemptions"], rows))
    # the pairs' ratios, from the table itself
    key = ["workload.session_rate_per_s", "policy.kind"]
    pf = d[d["scheduler.kind"] == "prefill_first"].set_index(key)
    ch = d[d["scheduler.kind"] == "chunked"].set_index(key)
    both = pf.index.intersection(ch.index)
    if len(both):
        r = {m: (ch.loc[both, m] / pf.loc[both, m]) for m in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "itl_p99_s")}
        span = {m: f"{v.min():.2f}-{v.max():.2f}x" for m, v in r.items()}
        s.append(f"Chunked over prefill-first, pair by pair: TTFT mean {span['ttft_mean_s']}, TTFT p99 "
                 f"{span['ttft_p99_s']}, TPOT mean {span['tpot_mean_s']}, ITL p99 {span['itl_p99_s']}. A prompt "
                 "no longer waits behind whole prefill iterations nor for HBM reserved for other turns' whole "
                 "replies; instead, blocks are allocated as tokens come, so a full HBM preempts (recompute) "
                 "where prefill-first would have made the turn wait. Freed blocks stay in HBM as a prefix cache, "
                 "so AttentionStore also hits in HBM, and its host tiers serve what HBM lost.\n")
    return s


def _differences_section(parts: dict[str, pd.DataFrame], cfg: dict) -> list[str]:
    s = ["## Differences from the paper, and why the numbers differ\n"]
    m = parts.get("models")
    hbm_note = ""
    if m is not None and not m.empty and "hbm_prefix" in set(m["policy.kind"]):
        h = _paired(m, ["model"], new="hbm_prefix")
        a = _paired(m, ["model"])
        hg = 1 - h["ttft_mean_s"] / h["ttft_mean_s_re"]
        ag = 1 - a["ttft_mean_s"] / a["ttft_mean_s_re"]
        hbm_note = (f" Here `hbm_prefix` cuts mean TTFT by {hg.min():.0%}–{hg.max():.0%} against recompute, "
                    f"AttentionStore by {ag.min():.0%}–{ag.max():.0%}.")
    items = [
        "**Simulated, not measured.** The paper measures its own serving system on real A100s. kvsim replays "
        "the same mechanisms as events over a roofline cost model (prefill at peak FLOPs × MFU, decode at HBM "
        "bandwidth × MBU, copies at link bandwidths) unless a measured hardware profile from `kvsim gpu "
        "calibrate` is given; these runs use the roofline. Kernel launch and framework overheads and the "
        "efficiency of real attention kernels at short lengths are not in it, so absolute TTFTs are not a "
        "real system's, and the balance between computing and loading a history rests on the assumed MFU "
        "and link bandwidths.",
        "**Workload size and load.** The paper replays ShareGPT at its own request rates; here "
        f"{cfg.get('workload', {}).get('max_sessions', '?')} sessions of the committed ShareGPT slice "
        "(`traces/sharegpt_small.parquet`) arrive as a Poisson process at an assumed rate, so the whole "
        "reproduction runs in well under the few minutes allowed on 2 cores. How much a recomputed prefill "
        "delays the turns queued behind it depends on that load; `paper/rate` shows how kvsim's gains move "
        "with it.",
        "**Baselines.** The paper's baseline recomputes the whole history every turn in its own engine; kvsim's "
        "`recompute` does the same inside kvsim's continuous-batching scheduler. kvsim also runs `hbm_prefix` "
        "(HBM-only prefix caching, vLLM/SGLang-style), which the paper's headline does not compare against."
        + hbm_note,
        "**GPU counts, DRAM and SSD per replica.** The paper's testbed is a node of A100-80GB GPUs with a "
        "DRAM + SSD store; which models ran on how many GPUs, and the exact DRAM/SSD sizes, are taken as marked "
        "in `configs/paper/base.yaml` and `configs/paper/sweeps/models.yaml` ([assumed] where not checked "
        "against the paper). The store scales with the replica's GPUs (128 GB DRAM + 2.5 TB SSD per GPU).",
        "**Cost model.** `cost_per_1k_turns_usd` is kvsim's cost of the work: the replica's hourly price "
        "(`sim/pricing.py`: GPUs, plus DRAM and SSD only for a policy that keeps a store, so recompute and "
        "HBM-only prefix caching do not pay for one) charged for its GPU-busy hours (`sim/metrics.py`); the "
        "prices are assumed cloud list prices, not the paper's. Whether reuse pays for its store then depends on how much of the GPU time prefill takes and "
        "on the price of DRAM and SSD next to a GPU hour (numbers below when the claim is not reproduced).",
        "**Prefill throughput** is counted as context tokens (history + new prompt) per second of GPU prefill "
        "time — how we read the paper's prefilling throughput — not tokens actually computed.",
        "**Mechanism details.** Layer-wise pre-loading is a closed-form pipeline over per-layer load and "
        "compute times with a read buffer; asynchronous saving overlaps the write-back with decode; scheduler-"
        "aware fetching and eviction use a look-ahead window of the FCFS queue. Their sizes and the paper's "
        "exact heuristics differ (see `sim/engine.py`); the truncation variant models the paper's decoupled "
        "positional encoding as \"a truncated history stays reusable\" vs \"truncation invalidates it\".",
        "**Seeds.** Every point runs with several seeds (the Poisson session arrivals are redrawn); "
        "tables quote the mean over seeds, figures the mean with min–max bars. The paper reports single runs.",
    ]
    if m is not None and not m.empty:
        g = _gains(m, ["model"])
        for c, (best, where) in zip(CLAIMS, best_gains(parts)):
            if best > c.paper_value:
                items.append(_beyond_paper(c, best, where))
                continue
            if best >= c.paper_value * 0.9:
                continue
            why = ""
            if c.metric == "prefill_tokens_per_s":
                r = g["reused_token_fraction"]
                why = (f" Reuse can at most skip the reused share r of the context, which bounds the prefill "
                       f"throughput gain near 1/(1−r): r is {r.min():.0%}–{r.max():.0%} on this slice "
                       f"(bound {1 / (1 - r.min()):.1f}×–{1 / (1 - r.max()):.1f}×). A 7.8× gain needs r ≈ 87%, "
                       f"i.e. long conversations whose history dwarfs each new prompt; this slice's "
                       f"conversations are shorter (and histories are truncated at the model's context window).")
            elif c.metric == "ttft_mean_s":
                r = g["reused_token_fraction"]
                why = (f" A turn still computes the part of its context that is not reused (the reused share r "
                       f"is {r.min():.0%}–{r.max():.0%} here) and waits for any load not hidden behind compute, "
                       f"so without heavy queueing the TTFT gain stays near r. The paper's −87% implies longer "
                       f"histories (higher r) or more queueing behind recomputed prefills than this slice at "
                       f"these rates produces.")
                if "rate" in parts and not parts["rate"].empty:
                    gr = _gains(parts["rate"], ["workload.session_rate_per_s"]).sort_values(
                        "workload.session_rate_per_s")
                    why += (f" In paper/rate the gain moves from {c.fmt(gr[f'gain:{c.metric}'].iloc[0])} at "
                            f"{gr['workload.session_rate_per_s'].iloc[0]:g} to {c.fmt(gr[f'gain:{c.metric}'].iloc[-1])} "
                            f"at {gr['workload.session_rate_per_s'].iloc[-1]:g} sessions/s.")
            elif c.metric == "cost_per_1k_turns_usd":
                saved = 1 - g["gpu_cost_usd"] / g["gpu_cost_usd_re"]
                added = g["storage_cost_usd"] / g["cost_usd_re"]
                prefill = g["gpu_prefill_s_re"] / g["gpu_busy_s_re"]
                why = (f" AttentionStore saves {saved.min():.0%}–{saved.max():.0%} of recompute's GPU cost "
                       f"(under recompute, prefill is only {prefill.min():.0%}–{prefill.max():.0%} of GPU busy time; "
                       f"decode is unchanged), while the store's DRAM + SSD charge adds "
                       f"{added.min():.0%}–{added.max():.0%} of recompute's cost. The paper's −70% needs prefill "
                       f"to dominate GPU time (long histories, short replies) and the store to be cheap next to "
                       f"the GPU hours it saves; prices here are assumed list prices, not the paper's.")
            items.append(f"**{c.what}: kvsim's best is {c.fmt(best)} ({where}), the paper's {c.paper}.**{why}")
    s += [f"{i + 1}. {t}" for i, t in enumerate(items)]
    return s + [""]


def _beyond_paper(c: Claim, best: float, where: str) -> str:
    """kvsim beating the paper is a difference to explain too, not a success to claim."""
    from sim.models import MODELS

    model = where.split()[0]
    why = ""
    if model in MODELS:
        m = MODELS[model]
        kv = m.kv_bytes_per_token / 2**20
        mha = [x for x in MODELS.values() if x.kv_heads == x.heads and x.layers == m.layers and x.name != model]
        why = (f" The best case is {model}, whose {m.kv_heads} KV heads (of {m.heads} query heads) make its KV "
               f"{kv:.2f} MiB per token")
        why += (f" against {mha[0].kv_bytes_per_token / 2**20:.2f} MiB for {mha[0].name} with as many layers"
                if mha else "")
        why += (": loading a history costs little next to recomputing it, so reuse wins by more.")
    return (f"**{c.what}: kvsim's best ({c.fmt(best)}, {where}) exceeds the paper's {c.paper}.**{why} The "
            f"simulation is also optimistic about the reuse path: copies run at the configured link bandwidth "
            f"with the overlap the closed-form pipeline allows, and no per-copy software overhead is charged. "
            f"Read the excess as a property of the simulation, not as evidence that the paper's system would reach it.")


if __name__ == "__main__":  # pragma: no cover
    print(write_report(os.environ.get("KVSIM_PAPER_RESULTS", "results/paper")))
