"""Capacity planning: the cheapest DRAM/SSD (and GPU count) that meets a latency SLO.

The search is a bisection on a ladder of DRAM sizes for each SSD size and GPU count: more DRAM keeps
more sessions' KV one hop closer to HBM (CachedAttention's hierarchical store, Sec. 3), so an SLO
metric such as TTFT p99 tends to fall as DRAM grows and the least feasible DRAM is found in
O(log n) evaluations.  It only tends to: the p99 of one realization of the arrivals is not monotone
in DRAM (a bigger store changes which turns queue behind which), so the answer does not trust the
bisection:

* each candidate is simulated R times, with seeds that redraw what the config draws at random
  (Poisson session arrivals, think times, a synthetic trace: `sim.sweep.seed_redraws`); every
  candidate gets the same seeds, so candidates are compared on the same arrivals;
* a candidate is feasible when the one-sided 95% Student-t confidence bound on the mean of the
  metric over its R runs meets the SLO (the upper bound for `<=`/`<`, the lower bound for `>=`/`>`):
  with 95% confidence the metric's expectation over arrival draws meets it.  Where the seed redraws
  nothing, one run is exact and R is 1;
* the answer is the cheapest evaluated feasible candidate, never the bisection's last point, so no
  evaluated configuration that is cheaper and meets the SLO is passed over;
* every pair of evaluated candidates at one GPU count where more capacity lost the SLO's verdict is
  flagged (the bisection may have skipped a cheaper feasible point between them).
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sim.errors import KvsimError
from sim.units import GB

_SLO_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(\S+)\s*$")
CONFIDENCE = 0.95
# One-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the value at 30
# (slightly wider than the exact quantile, so the bound stays conservative).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
        1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
        1.699, 1.697)
# The DRAM ladder is held in memory and printed: refuse a step that makes it longer than this.
MAX_LADDER = 10_000
MAX_REPLICATIONS = 100
SLO_MAX = 1e9  # 11 days in ms, a billion tokens/s or dollars: a bound no candidate's metric is near


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

    @property
    def lower_is_better(self) -> bool:
        return self.op in ("<=", "<")

    def meets(self, e: "Evaluation") -> bool:
        """The candidate's verdict: its confidence bound (not its mean) meets the SLO."""
        return self.met(e.bound(self.lower_is_better))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_slo(text: str) -> Slo:
    """'ttft_p99_ms<=500' -> Slo('ttft_p99_ms', '<=', 500.0)."""
    m = _SLO_RE.match(text or "")
    expect = "expected METRIC<=VALUE (or <, >=, >) with a finite number, e.g. ttft_p99_ms<=500"
    if not m:
        raise KvsimError(f"--slo {text!r}: {expect}")
    try:
        threshold = float(m.group(3))
    except ValueError:
        raise KvsimError(f"--slo {text!r}: {m.group(3)!r} is not a number; {expect}") from None
    if not math.isfinite(threshold):
        raise KvsimError(f"--slo {text!r}: {m.group(3)!r} is not finite; {expect}")
    if not 0 <= threshold <= SLO_MAX:  # every metric is a time, a rate, a count or a price: none is negative
        raise KvsimError(f"--slo {text!r}: expected a threshold from 0 to {SLO_MAX:g} (beyond, every candidate "
                         f"meets or misses it), got {m.group(3)}")
    return Slo(m.group(1), m.group(2), threshold)


def metric_value(summary: dict[str, Any], metric: str, flag: str = "--slo") -> float:
    """Read `metric` from a run summary; a name ending in _ms reads the matching _s key in milliseconds.
    `flag` is the option that named the metric, for the error."""
    if metric in summary:
        value, scale = summary[metric], 1.0
    elif metric.endswith("_ms") and metric[:-3] + "_s" in summary:
        value, scale = summary[metric[:-3] + "_s"], 1000.0
    else:
        value, scale = None, 1.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * scale
    known = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    what = "not a numeric summary metric" if value is not None else "not a summary metric"
    raise KvsimError(f"{flag}: {metric}: {what}; expected one of {known} (or an _s key as _ms)")


def t_quantile_95(df: int) -> float:
    """One-sided 95% quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    return _T95[min(df, len(_T95)) - 1]


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


def capacity_ladder(lo: float, hi: float, step: float, flags: tuple[str, str, str] = ("--dram-min", "--dram-max",
                                                                                     "--dram-step")) -> list[float]:
    """lo, lo+step, ..., hi (hi always included), at most MAX_LADDER values; `flags` name lo, hi, step in errors."""
    if not step > 0:
        raise KvsimError(f"{flags[2]}: expected a size > 0, got {step:g} bytes")
    if hi < lo:
        raise KvsimError(f"{flags[0]}: {lo / GB:g} GB is above {flags[1]} {hi / GB:g} GB; expected min <= max")
    steps = (hi - lo) / step  # a float: a tiny step makes it inf, which int() cannot take
    if not steps + 1 <= MAX_LADDER:
        raise KvsimError(f"{flags[2]}: {step:g} bytes makes {steps + 1:,.0f} sizes from {lo / GB:g} GB to "
                         f"{hi / GB:g} GB; expected at most {MAX_LADDER:,} (a step of at least "
                         f"{(hi - lo) / (MAX_LADDER - 1) / GB:.3g} GB)")
    n = int(math.floor(steps + 1e-9))
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
    """One candidate's runs: the SLO metric of each replication, and the cost to rank by (their mean)."""
    values: tuple[float, ...]
    cost: float
    summaries: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        vals = (self.values,) if isinstance(self.values, (int, float)) else tuple(self.values)
        if not vals:
            raise ValueError("an evaluation needs at least one run")
        object.__setattr__(self, "values", tuple(float(v) for v in vals))

    @property
    def value(self) -> float:
        """Mean of the metric over the replications."""
        return statistics.fmean(self.values)

    def bound(self, upper: bool) -> float:
        """One-sided 95% Student-t confidence bound on the mean (upper or lower); the mean itself when
        there is one run (nothing to bound with: the caller states that)."""
        n = len(self.values)
        if n < 2:
            return self.value
        half = t_quantile_95(n - 1) * statistics.stdev(self.values) / math.sqrt(n)
        return self.value + half if upper else self.value - half


@dataclass(frozen=True)
class FrontierPoint:
    """The least DRAM the search found feasible for one (GPU count, SSD size), or None when none was."""
    gpus: int
    ssd_bytes: float
    dram_bytes: float | None
    evaluation: Evaluation | None


@dataclass(frozen=True)
class Plan:
    slo: Slo
    best: FrontierPoint | None  # the cheapest evaluated candidate that meets the SLO
    frontier: list[FrontierPoint]
    evaluations: dict[Candidate, Evaluation]
    monotonicity_violations: list[tuple[Candidate, Candidate]]
    method: str = ""  # how candidates were replicated and judged, for the printout


def plan_capacity(evaluate_many: Callable[[list[Candidate]], list[Evaluation]], slo: Slo, gpus: Sequence[int],
                  ssd_ladder: Sequence[float], dram_ladder: Sequence[float], width: int = 1, method: str = "") -> Plan:
    """Search DRAM by (k-section) bisection for each GPU count and SSD size; answer with the cheapest
    evaluated candidate that meets the SLO (`slo.meets`), whatever the bisection concluded.

    `evaluate_many` runs a batch of candidates (in parallel if it can); results are memoised so no
    candidate is simulated twice.  Walking the SSD sizes upwards, the last answer bounds the next
    search from above; where the bound does not hold (the SLO is lost with more SSD), the DRAM above
    it is searched too.
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
        top = len(dram_ladder) - 1
        for ssd in sorted(set(float(s) for s in ssd_ladder)):
            def judge(ds: list[float]) -> list[bool]:
                return [slo.meets(e) for e in run([Candidate(g, d, ssd) for d in ds])]

            answer, _ = search_min_feasible(dram_ladder[: top + 1], judge, width=width)
            if answer is None and top < len(dram_ladder) - 1:
                answer, _ = search_min_feasible(dram_ladder[top:], judge, width=width)
            if answer is None:
                frontier.append(FrontierPoint(g, ssd, None, None))
                continue
            frontier.append(FrontierPoint(g, ssd, answer, memo[Candidate(g, answer, ssd)]))
            top = dram_ladder.index(answer)
            if top == 0:
                break  # DRAM is at its floor: a bigger SSD can only add cost
    feasible = [(c, e) for c, e in memo.items() if slo.meets(e)]
    best = None
    if feasible:
        c, e = min(feasible, key=lambda ce: (ce[1].cost, ce[0].gpus, ce[0].ssd_bytes, ce[0].dram_bytes))
        best = FrontierPoint(c.gpus, c.ssd_bytes, c.dram_bytes, e)
    return Plan(slo, best, frontier, memo, monotonicity_violations(memo, slo), method)


def monotonicity_violations(evals: dict[Candidate, Evaluation], slo: Slo) -> list[tuple[Candidate, Candidate]]:
    """Every pair (smaller, larger) at one GPU count, the larger having at least as much DRAM and SSD,
    where the smaller meets the SLO and the larger does not: the verdict the bisection assumes to be
    monotone in capacity is not."""
    items = sorted(evals.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes))
    ok = {c: slo.meets(e) for c, e in items}
    return [(ca, cb) for i, (ca, _) in enumerate(items) for cb, _ in items[i + 1:]
            if cb.gpus == ca.gpus and cb.dram_bytes >= ca.dram_bytes and cb.ssd_bytes >= ca.ssd_bytes
            and ok[ca] and not ok[cb]]


# ---------------------------------------------------------------- simulator-backed evaluation

PROVISIONED = "provisioned_usd_per_hour"


def provisioned_usd_per_hour(cfg) -> float:
    """What the hardware of a config costs per hour when provisioned, busy or not (sim/pricing.py: GPUs,
    plus DRAM and SSD when the policy keeps a store). Unlike cost_per_1k_turns_usd it does not fall as
    capacity grows, which is what makes "least capacity that meets the SLO" the cheapest answer."""
    from sim.pricing import hourly_rate

    return hourly_rate(cfg).total_usd


def _evaluate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Worker: simulate one resolved config and return its summary (module level for process pools)."""
    from sim.sweep import simulate_config

    return dict(simulate_config(config).summary)


@dataclass
class SimulatorEvaluator:
    """`evaluate_many` over the simulator: each candidate is `base_config` + `overrides` + its capacity,
    run once per seed in `seeds` (`jobs` runs at a time). Call close() to stop the worker pool."""
    base_config: Any
    overrides: dict[str, Any]
    slo: Slo
    cost_metric: str
    jobs: int = 1
    replications: int = 5

    def __post_init__(self):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from sim.config import config_to_dict, load_config
        from sim.sweep import seed_redraws

        base = load_config(self.base_config, self.overrides)
        self.redraws = seed_redraws(config_to_dict(base))
        n = self.replications if self.redraws else 1  # a seed that redraws nothing repeats the same run
        self.seeds = [base.seed + k for k in range(n)]
        self._pool = (ProcessPoolExecutor(max_workers=self.jobs, mp_context=get_context("spawn"))
                      if self.jobs > 1 else None)

    @property
    def method(self) -> str:
        if not self.redraws:
            return ("the seed redraws nothing in this config (trace-driven arrivals and think times), so one run "
                    "per candidate is exact; feasible when that run meets the SLO")
        if len(self.seeds) == 1:
            return (f"one run per candidate (seed {self.seeds[0]}, which redraws {', '.join(self.redraws)}): "
                    f"no confidence bound; feasible when that run meets the SLO")
        side = "upper" if self.slo.lower_is_better else "lower"
        return (f"{len(self.seeds)} runs per candidate (seeds {self.seeds[0]}..{self.seeds[-1]} redraw "
                f"{', '.join(self.redraws)}; the same seeds for every candidate); feasible when the one-sided "
                f"{CONFIDENCE:.0%} Student-t {side} confidence bound on the mean {self.slo.metric} meets the SLO")

    def __call__(self, cands: list[Candidate]) -> list[Evaluation]:
        from sim.config import config_to_dict, load_config

        runs = []
        for c in cands:
            for seed in self.seeds:
                cfg = load_config(self.base_config, {**self.overrides, "gpu.count": c.gpus, "seed": seed,
                                                     "host.dram_bytes": int(c.dram_bytes), "ssd.bytes": int(c.ssd_bytes)})
                runs.append((cfg, config_to_dict(cfg)))
        dicts = [d for _, d in runs]
        summaries = list(self._pool.map(_evaluate_config, dicts)) if self._pool else [_evaluate_config(d) for d in dicts]
        out, r = [], len(self.seeds)
        for i in range(len(cands)):
            chunk = summaries[i * r:(i + 1) * r]
            values = tuple(metric_value(s, self.slo.metric, "--slo") for s in chunk)
            if self.cost_metric == PROVISIONED:
                cost = provisioned_usd_per_hour(runs[i * r][0])
            else:
                cost = statistics.fmean(metric_value(s, self.cost_metric, "--cost") for s in chunk)
            out.append(Evaluation(values, cost, tuple(chunk)))
        return out

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()


# ---------------------------------------------------------------- printing

def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / GB:,.0f} GB"


def _spread(e: Evaluation, slo: Slo) -> str:
    if len(e.values) < 2:
        return f"{e.value:10.4g}"
    return f"{e.value:10.4g} (bound {e.bound(slo.lower_is_better):.4g}, n={len(e.values)})"


def format_plan(plan: Plan, cost_metric: str) -> str:
    """The answer first, then the frontier and the curve (every evaluated point) that support it."""
    lines = []
    if plan.best is None:
        lines.append(f"NO configuration in the searched range meets {plan.slo}.")
    else:
        b = plan.best
        lines.append(f"cheapest configuration meeting {plan.slo}: {b.gpus} GPU(s), DRAM {_gb(b.dram_bytes)}, "
                     f"SSD {_gb(b.ssd_bytes)}  ->  {plan.slo.metric} = {_spread(b.evaluation, plan.slo).strip()}, "
                     f"{cost_metric} = {b.evaluation.cost:.4g}")
    if plan.method:
        lines.append(f"judged on {plan.method}.")
    lines.append("")
    lines.append("frontier (least DRAM the bisection found meeting the SLO, per GPU count and SSD size):")
    lines.append(f"  {'gpus':>4}  {'ssd':>10}  {'dram':>10}  {plan.slo.metric:>14}  {cost_metric:>22}")
    best = (plan.best.gpus, plan.best.ssd_bytes, plan.best.dram_bytes) if plan.best else None
    for f in plan.frontier:
        v = f"{f.evaluation.value:.4g}" if f.evaluation else "infeasible"
        c = f"{f.evaluation.cost:.4g}" if f.evaluation else "-"
        mark = "  <- cheapest" if (f.gpus, f.ssd_bytes, f.dram_bytes) == best else ""
        lines.append(f"  {f.gpus:>4}  {_gb(f.ssd_bytes):>10}  {_gb(f.dram_bytes):>10}  {v:>14}  {c:>22}{mark}")
    runs = sum(len(e.values) for e in plan.evaluations.values())
    lines.append("")
    lines.append(f"evaluated points ({len(plan.evaluations)} candidates, {runs} simulations), "
                 f"{plan.slo.metric} vs DRAM:")
    cur = None
    for c, e in sorted(plan.evaluations.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes)):
        if (c.gpus, c.ssd_bytes) != cur:
            cur = (c.gpus, c.ssd_bytes)
            lines.append(f"  gpus={c.gpus} ssd={_gb(c.ssd_bytes)}")
        ok = "meets" if plan.slo.meets(e) else "misses"
        mark = "  <- cheapest" if (c.gpus, c.ssd_bytes, c.dram_bytes) == best else ""
        lines.append(f"    dram {_gb(c.dram_bytes):>10}  {plan.slo.metric}={_spread(e, plan.slo)}  {ok:6}  "
                     f"{cost_metric}={e.cost:.4g}{mark}")
    if plan.monotonicity_violations:
        lines.append("")
        lines.append(f"WARNING: {len(plan.monotonicity_violations)} pair(s) of evaluated points where more capacity "
                     f"loses the SLO that less capacity meets; the bisection assumes this never happens, so a "
                     f"cheaper feasible size may exist between points it did not evaluate:")
        for a, b in plan.monotonicity_violations:
            lines.append(f"  {a.gpus} GPU(s): DRAM {_gb(a.dram_bytes)} + SSD {_gb(a.ssd_bytes)} meets, "
                         f"DRAM {_gb(b.dram_bytes)} + SSD {_gb(b.ssd_bytes)} misses")
    return "\n".join(lines)


def plan_table(plan: Plan, cost_metric: str):
    """Every evaluated candidate as a table (one row each: mean, bound, runs), the frontier marked."""
    import pandas as pd

    frontier = {(f.gpus, f.ssd_bytes, f.dram_bytes) for f in plan.frontier if f.dram_bytes is not None}
    best = (plan.best.gpus, plan.best.ssd_bytes, plan.best.dram_bytes) if plan.best else None
    rows = [{"gpus": c.gpus, "dram_bytes": c.dram_bytes, "ssd_bytes": c.ssd_bytes, plan.slo.metric: e.value,
             f"{plan.slo.metric}_bound": e.bound(plan.slo.lower_is_better), "runs": len(e.values),
             cost_metric: e.cost, "meets_slo": plan.slo.meets(e),
             "frontier": (c.gpus, c.ssd_bytes, c.dram_bytes) in frontier,
             "cheapest": (c.gpus, c.ssd_bytes, c.dram_bytes) == best}
            for c, e in sorted(plan.evaluations.items(), key=lambda kv: (kv[0].gpus, kv[0].ssd_bytes, kv[0].dram_bytes))]
    return pd.DataFrame(rows)


def write_plan(plan: Plan, cost_metric: str, out_dir) -> list:
    """plan.csv (every candidate) and plan.png/.pdf (the SLO metric vs DRAM per GPU count and SSD size)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.files import atomic_write, atomic_write_text

    out = Path(out_dir)
    df = plan_table(plan, cost_metric)
    atomic_write_text(out / "plan.csv", df.to_csv(index=False))
    m = plan.slo.metric
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, ((g, ssd), d) in enumerate(df.groupby(["gpus", "ssd_bytes"])):
        color = f"C{i % 10}"
        ax.plot(d["dram_bytes"] / GB, d[m], "-o", ms=4, color=color, label=f"{g} GPU, SSD {ssd / GB:,.0f} GB")
        if (d["runs"] > 1).any():  # the bound each verdict was judged on
            ax.vlines(d["dram_bytes"] / GB, d[m], d[f"{m}_bound"], color=color, lw=1)
        miss = d[~d["meets_slo"]]
        ax.plot(miss["dram_bytes"] / GB, miss[m], "x", color="k", ms=6)
    ax.plot([], [], "x", color="k", label="misses the SLO")
    ax.axhline(plan.slo.threshold, color="k", ls="--", lw=1, label=f"SLO {plan.slo}")
    if plan.best is not None:
        ax.plot([plan.best.dram_bytes / GB], [plan.best.evaluation.value], "r*", ms=14, label="cheapest meeting SLO")
    ax.set_xlabel("DRAM per replica (GB)")
    unit = " (ms)" if m.endswith("_ms") else (" (s)" if m.endswith("_s") else "")
    runs = int(df["runs"].max()) if len(df) else 1
    ax.set_ylabel(m + unit + (f", mean of {runs} runs; bar to the 95% bound" if runs > 1 else ""))
    ax.set_title("Capacity plan: points the bisection evaluated")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "plan.csv"]
    for ext in ("png", "pdf"):
        paths.append(atomic_write(out / f"plan.{ext}", lambda p, ext=ext: fig.savefig(p, format=ext, dpi=130)))
    plt.close(fig)
    return paths
