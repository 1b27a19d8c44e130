"""Capacity planning: the cheapest DRAM/SSD (and GPU count) that meets a latency SLO.

The search leans on monotonicity instead of a grid.  With the workload and the GPUs fixed, more
DRAM can only keep more sessions' KV one hop closer to HBM (CachedAttention's hierarchical store,
Sec. 3: a bigger tier holds more sessions, so more turns reuse instead of recomputing), so an SLO
metric such as TTFT p99 is
non-increasing in DRAM: the configurations that meet the SLO form an interval [d*, max] and d* is
found by bisection on a ladder of DRAM sizes in O(log n) simulations.  SSD capacity enters the
same way, so d*(ssd) is non-increasing in SSD size; walking a small SSD ladder upwards, the last
answer bounds the next search from above, and once d* reaches the bottom of the ladder larger
SSDs can only cost more.  The simulator is not guaranteed to be monotone (scheduling effects can
make a bigger cache slightly slower), so every evaluated point is reported and any violation of
monotonicity among them is flagged next to the answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sim.errors import KvsimError

_SLO_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Slo:
    """A bound on one summary metric, e.g. ttft_p99_ms <= 500."""
    metric: str
    op: str
    threshold: float

    def met(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return {"<=": value <= self.threshold, "<": value < self.threshold,
                ">=": value >= self.threshold, ">": value > self.threshold}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_slo(text: str) -> Slo:
    """'ttft_p99_ms<=500' -> Slo('ttft_p99_ms', '<=', 500.0)."""
    m = _SLO_RE.match(text or "")
    if not m:
        raise KvsimError(f"--slo: {text!r}: expected METRIC<=VALUE (or <, >=, >), e.g. ttft_p99_ms<=500")
    return Slo(m.group(1), m.group(2), float(m.group(3)))


def metric_value(summary: dict[str, Any], metric: str) -> float:
    """Read `metric` from a run summary; a name ending in _ms reads the matching _s key in milliseconds."""
    if metric in summary:
        return float(summary[metric])
    if metric.endswith("_ms") and metric[:-3] + "_s" in summary:
        return float(summary[metric[:-3] + "_s"]) * 1000.0
    known = sorted(k for k, v in summary.items() if isinstance(v, (int, float)))
    raise KvsimError(f"--slo: {metric}: not a summary metric; expected one of {known} (or an _s key as _ms)")


# ---------------------------------------------------------------- monotone search on a ladder

def search_min_feasible(ladder: Sequence[float], feasible_many: Callable[[list[float]], list[bool]],
                        width: int = 1, hi_known_feasible: bool = False) -> tuple[float | None, list[tuple[float, bool]]]:
    """Smallest ladder value that is feasible, assuming feasibility is monotone (False..False True..True).

    `feasible_many` judges a batch of values (evaluated in parallel by the caller); each round asks
    for at most `width` interior values, splitting the open interval into width+1 parts, so width=1
    is plain bisection with ceil(log2 n) rounds.  Returns (answer or None, every (value, feasible)
    judged, in order).  `hi_known_feasible` skips judging the top when the caller already knows it.
    """
    ladder = sorted(set(float(x) for x in ladder))
    if not ladder:
        raise ValueError("empty ladder")
    judged: list[tuple[float, bool]] = []

    def ask(idx: list[int]) -> list[bool]:
        res = feasible_many([ladder[i] for i in idx])
        judged.extend((ladder[i], bool(r)) for i, r in zip(idx, res))
        return [bool(r) for r in res]

    hi = len(ladder) - 1
    if not hi_known_feasible:
        if not ask([hi])[0]:
            return None, judged
    if hi == 0:
        return ladder[0], judged
    if ask([0])[0]:
        return ladder[0], judged
    lo = 0  # invariant: ladder[lo] infeasible, ladder[hi] feasible
    while hi - lo > 1:
        n = min(width, hi - lo - 1)
        idx = sorted({lo + round((hi - lo) * (k + 1) / (n + 1)) for k in range(n)} - {lo, hi})
        res = ask(idx)
        for i, ok in zip(idx, res):
            if ok:
                hi = i
                break
            lo = i
    return ladder[hi], judged


def capacity_ladder(lo: float, hi: float, step: float) -> list[float]:
    """lo, lo+step, ..., hi (hi always included)."""
    if step <= 0 or hi < lo:
        raise KvsimError(f"plan: capacity range {lo:g}..{hi:g} step {step:g}: expected 0 < step and lo <= hi")
    n = int(math.floor((hi - lo) / step + 1e-9))
    vals = [lo + k * step for k in range(n + 1)]
    if vals[-1] < hi:
        vals.append(hi)
    return vals


# ---------------------------------------------------------------- the planner

@dataclass(frozen=True)
class Candidate:
    gpus: int
    dram_bytes: float
    ssd_bytes: float


@dataclass(frozen=True)
class Evaluation:
    """What the planner needs from one simulation: the SLO metric and the cost to rank by."""
    value: float
    cost: float
    summary: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class FrontierPoint:
    """The least DRAM meeting the SLO for one (GPU count, SSD size), or None when none does."""
    gpus: int
    ssd_bytes: float
    dram_bytes: float | None
    evaluation: Evaluation | None


@dataclass(frozen=True)
class Plan:
    slo: Slo
    best: FrontierPoint | None
    frontier: list[FrontierPoint]
    evaluations: dict[Candidate, Evaluation]
    monotonicity_violations: list[tuple[Candidate, Candidate]]


def plan_capacity(evaluate_many: Callable[[list[Candidate]], list[Evaluation]], slo: Slo, gpus: Sequence[int],
                  ssd_ladder: Sequence[float], dram_ladder: Sequence[float], width: int = 1) -> Plan:
    """Search DRAM by monotone (k-section) search for each GPU count and SSD size; pick the cheapest.

    `evaluate_many` runs a batch of candidates (in parallel if it can); results are memoised so no
    configuration is simulated twice.
    """
    memo: dict[Candidate, Evaluation] = {}

    def run(cands: list[Candidate]) -> list[Evaluation]:
        new = [c for c in dict.fromkeys(cands) if c not in memo]
        if new:
            for c, e in zip(new, evaluate_many(new)):
                memo[c] = e
        return [memo[c] for c in cands]

    frontier: list[FrontierPoint] = []
    dram_ladder = sorted(set(float(d) for d in dram_ladder))
    for g in gpus:
        top = len(dram_ladder) - 1  # d*(ssd) is non-increasing in ssd: the last answer bounds the next
        known = False
        for ssd in sorted(set(float(s) for s in ssd_ladder)):
            ladder = dram_ladder[: top + 1]
            answer, _ = search_min_feasible(
                ladder, lambda ds: [slo.met(e.value) for e in run([Candidate(g, d, ssd) for d in ds])],
                width=width, hi_known_feasible=known)
            if answer is None:
                frontier.append(FrontierPoint(g, ssd, None, None))
                continue
            frontier.append(FrontierPoint(g, ssd, answer, run([Candidate(g, answer, ssd)])[0]))
            top, known = dram_ladder.index(answer), True
            if top == 0:
                break  # DRAM is at its floor: a bigger SSD can only add cost
    feasible = [f for f in frontier if f.evaluation is not None]
    best = min(feasible, key=lambda f: (f.evaluation.cost, f.gpus, f.ssd_bytes, f.dram_bytes)) if feasible else None
    return Plan(slo, best, frontier, memo, monotonicity_violations(memo, slo))


def monotonicity_violations(evals: dict[Candidate, Evaluation], slo: Slo) -> list[tuple[Candidate, Candidate]]:
    """Pairs (smaller, larger) at one GPU count where the larger capacity did worse on the SLO metric."""
    worse = (lambda a, b: b > a) if slo.op in ("<=", "<") else (lambda a, b: b < a)
    items = sorted(evals.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes))
    out = []
    for i, (ca, ea) in enumerate(items):
        for cb, eb in items[i + 1:]:
            if (cb.gpus == ca.gpus and cb.dram_bytes >= ca.dram_bytes and cb.ssd_bytes >= ca.ssd_bytes
                    and cb != ca and worse(ea.value, eb.value) and slo.met(ea.value) != slo.met(eb.value)):
                out.append((ca, cb))
    return out


# ---------------------------------------------------------------- simulator-backed evaluation

PROVISIONED = "provisioned_usd_per_hour"


def provisioned_usd_per_hour(config: dict[str, Any]) -> float:
    """What the hardware of a resolved config costs per hour when provisioned, busy or not:
    GPUs plus the KV store's DRAM and SSD, at the config's prices (the same prices the run's
    cost_usd uses).  Unlike cost_per_1k_turns_usd it grows strictly with capacity, which is what
    makes "least capacity that meets the SLO" the cheapest answer within one SSD size."""
    p = config["prices"]
    return (config["gpu"]["count"] * p["gpu_per_hour_usd"] + config["host"]["dram_bytes"] / 1e9 * p["dram_per_gb_hour_usd"]
            + config["ssd"]["bytes"] / 1e9 * p["ssd_per_gb_hour_usd"])


def _evaluate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Worker: simulate one resolved config and return its summary (module level for process pools)."""
    from sim.sweep import simulate_config

    return dict(simulate_config(config).summary)


def simulator_evaluator(base_config, overrides: dict[str, Any], slo: Slo, cost_metric: str, jobs: int = 1):
    """An `evaluate_many` that simulates candidates from `base_config` + `overrides`, `jobs` at a time.

    Returns (evaluate_many, close) — call close() to stop the worker pool."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from sim.config import config_to_dict, load_config

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) if jobs > 1 else None

    def evaluate_many(cands: list[Candidate]) -> list[Evaluation]:
        configs = [config_to_dict(load_config(base_config, {**overrides, "gpu.count": c.gpus,
                                                            "host.dram_bytes": int(c.dram_bytes),
                                                            "ssd.bytes": int(c.ssd_bytes)}))
                   for c in cands]
        summaries = list(pool.map(_evaluate_config, configs)) if pool else [_evaluate_config(c) for c in configs]
        return [Evaluation(metric_value(s, slo.metric),
                           provisioned_usd_per_hour(c) if cost_metric == PROVISIONED else metric_value(s, cost_metric), s)
                for c, s in zip(configs, summaries)]

    def close() -> None:
        if pool:
            pool.shutdown()

    return evaluate_many, close


# ---------------------------------------------------------------- printing

def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e9:,.0f} GB"


def format_plan(plan: Plan, cost_metric: str) -> str:
    """The answer first, then the frontier and the curve (every evaluated point) that support it."""
    lines = []
    if plan.best is None:
        lines.append(f"NO configuration in the searched range meets {plan.slo}.")
    else:
        b = plan.best
        lines.append(f"cheapest configuration meeting {plan.slo}: {b.gpus} GPU(s), DRAM {_gb(b.dram_bytes)}, "
                     f"SSD {_gb(b.ssd_bytes)}  ->  {plan.slo.metric} = {b.evaluation.value:.4g}, "
                     f"{cost_metric} = {b.evaluation.cost:.4g}")
    lines.append("")
    lines.append("frontier (least DRAM meeting the SLO per GPU count and SSD size):")
    lines.append(f"  {'gpus':>4}  {'ssd':>10}  {'dram':>10}  {plan.slo.metric:>14}  {cost_metric:>22}")
    for f in plan.frontier:
        v = f"{f.evaluation.value:.4g}" if f.evaluation else "infeasible"
        c = f"{f.evaluation.cost:.4g}" if f.evaluation else "-"
        mark = "  <- cheapest" if f is plan.best else ""
        lines.append(f"  {f.gpus:>4}  {_gb(f.ssd_bytes):>10}  {_gb(f.dram_bytes):>10}  {v:>14}  {c:>22}{mark}")
    lines.append("")
    lines.append(f"evaluated points ({len(plan.evaluations)} simulations), {plan.slo.metric} vs DRAM:")
    cur = None
    for c, e in sorted(plan.evaluations.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes)):
        if (c.gpus, c.ssd_bytes) != cur:
            cur = (c.gpus, c.ssd_bytes)
            lines.append(f"  gpus={c.gpus} ssd={_gb(c.ssd_bytes)}")
        ok = "meets" if plan.slo.met(e.value) else "misses"
        lines.append(f"    dram {_gb(c.dram_bytes):>10}  {plan.slo.metric}={e.value:10.4g}  {ok:6}  "
                     f"{cost_metric}={e.cost:.4g}")
    if plan.monotonicity_violations:
        lines.append("")
        lines.append(f"WARNING: {len(plan.monotonicity_violations)} pair(s) of evaluated points break the "
                     f"monotonicity the bisection assumes (more capacity, worse {plan.slo.metric}); "
                     f"the answer may not be the least capacity. First: "
                     f"{plan.monotonicity_violations[0][0]} vs {plan.monotonicity_violations[0][1]}")
    return "\n".join(lines)


def plan_table(plan: Plan, cost_metric: str):
    """Every evaluated point as a table (one row per simulation), the frontier marked."""
    import pandas as pd

    frontier = {(f.gpus, f.ssd_bytes, f.dram_bytes) for f in plan.frontier if f.dram_bytes is not None}
    best = (plan.best.gpus, plan.best.ssd_bytes, plan.best.dram_bytes) if plan.best else None
    rows = [{"gpus": c.gpus, "dram_bytes": c.dram_bytes, "ssd_bytes": c.ssd_bytes, plan.slo.metric: e.value,
             cost_metric: e.cost, "meets_slo": plan.slo.met(e.value),
             "frontier": (c.gpus, c.ssd_bytes, c.dram_bytes) in frontier,
             "cheapest": (c.gpus, c.ssd_bytes, c.dram_bytes) == best}
            for c, e in sorted(plan.evaluations.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes))]
    return pd.DataFrame(rows)


def write_plan(plan: Plan, cost_metric: str, out_dir) -> list:
    """plan.csv (every simulation) and plan.png/.pdf (the SLO metric vs DRAM per GPU count and SSD size)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = plan_table(plan, cost_metric)
    tmp = out / ".plan.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(out / "plan.csv")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (g, ssd), d in df.groupby(["gpus", "ssd_bytes"]):
        ax.plot(d["dram_bytes"] / 1e9, d[plan.slo.metric], "-o", ms=4, label=f"{g} GPU, SSD {ssd / 1e9:,.0f} GB")
    ax.axhline(plan.slo.threshold, color="k", ls="--", lw=1, label=f"SLO {plan.slo}")
    if plan.best is not None:
        ax.plot([plan.best.dram_bytes / 1e9], [plan.best.evaluation.value], "r*", ms=14, label="cheapest meeting SLO")
    ax.set_xlabel("DRAM per replica (GB)")
    unit = " (ms)" if plan.slo.metric.endswith("_ms") else (" (s)" if plan.slo.metric.endswith("_s") else "")
    ax.set_ylabel(plan.slo.metric + unit)
    ax.set_title("Capacity plan: points the bisection evaluated")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "plan.csv"]
    for ext in ("png", "pdf"):
        tmp = out / f".plan.tmp.{ext}"
        fig.savefig(tmp, dpi=130)
        tmp.replace(out / f"plan.{ext}")
        paths.append(out / f"plan.{ext}")
    plt.close(fig)
    return paths
