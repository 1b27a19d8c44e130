"""One row per turn, and the summary a capacity planner reads: the latency metrics as vLLM's serving
benchmark reports them (TTFT, TPOT, ITL, E2E, goodput at SLOs), hit rates, HBM use and cost.

The definitions follow vLLM's `benchmarks/benchmark_serving.py` (`calculate_metrics`): a turn's TPOT
is (E2E - TTFT) / (output tokens - 1), only for replies of more than one token; ITL is every gap
between two consecutive tokens of a reply, its percentiles taken over all gaps of all turns; goodput
is the turns per second that meet every SLO (a one-token reply meets any TPOT bound).

Memory: a run keeps its per-turn columns in `array.array`s (8 bytes a value, against ~32 for a float
in a Python list), and the per-token gaps are never stored: decode spans feed a log-binned histogram.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from sim.pricing import hourly_rate
from sim.tiers import TIER_CODES
from sim.units import HOUR


@dataclass(frozen=True)
class GoodputSlo:
    """Per-turn bounds a turn must all meet to count towards goodput (None: not applied).

    The defaults are MLPerf Inference's server-scenario latency bounds for LLaMA-2-70B
    (mlcommons/inference `loadgen/mlperf.conf`: `llama2-70b.Server.ttft_latency = 2000`,
    `tpot_latency = 200`, in ms), the LLaMA-2 family kvsim models. MLPerf applies them to the p99;
    here, as in vLLM's `--goodput ttft:2000,tpot:200`, each turn is judged on its own values."""
    ttft_s: Optional[float] = 2.0
    tpot_s: Optional[float] = 0.2
    e2e_s: Optional[float] = None


DEFAULT_SLO = GoodputSlo()


class GapHistogram:
    """Inter-token gaps (ITL) in fixed log-spaced bins: `RATIO` = 1.005, so each bin is 0.5% wide,
    from `LOW_S` (1 us; smaller gaps share the first bin) to 10^4 s (larger ones share the last).

    A decode span adds `batch` gaps of each of its k iterations, whose lengths grow linearly
    (a + d j): the k iterations are spread over the bins they cover (O(bins covered), a few for a
    span). Spans are buffered in plain lists (the engine's hot path pays two list extends) and binned
    in numpy batches small enough for the temporaries to stay in cache. Each bin also sums its gaps,
    so the mean is exact and a percentile is the mean of the gaps in the bin holding its rank: exact
    where that bin holds one distinct length, within the bin's 0.5% otherwise."""

    RATIO = 1.005
    LOW_S = 1e-6
    HIGH_S = 1e4
    NBINS = int(math.ceil(math.log(HIGH_S / LOW_S) / math.log(RATIO))) + 1
    FLUSH = 2 << 16  # buffered span counts (two a span) binned at once: per-flush set-up amortised

    def __init__(self):
        self.counts = np.zeros(self.NBINS, dtype=np.float64)  # whole numbers (< 2^53), float for bincount
        self.sums = np.zeros(self.NBINS, dtype=np.float64)
        # buffered spans, flat and split by type (numpy converts a list of one type fastest): spans of
        # equal iterations (the engines' every span) as (batch, k, ...) and (length_s, ...), spans whose
        # iterations grow as (batch, k, ...) and (first_s, growth_s, ...)
        self.span_counts, self.span_times = [], []
        self.grow_counts, self.grow_times = [], []
        self._edges = self.LOW_S * np.power(self.RATIO, np.arange(self.NBINS + 1, dtype=float))
        self._log_ratio = math.log(self.RATIO)

    def add_span(self, batch: int, k: int, first_s: float, growth_s: float) -> None:
        """k iterations of `batch` sequences, iteration j lasting first_s + growth_s * j."""
        if growth_s:
            self.grow_counts += (batch, k)
            self.grow_times += (first_s, growth_s)
        else:
            self.span_counts += (batch, k)
            self.span_times.append(first_s)
        if len(self.span_counts) + len(self.grow_counts) >= self.FLUSH:
            self.flush()

    def add_gaps(self, seconds: float, count: int) -> None:
        """`count` gaps of `seconds` each."""
        self.add_span(count, 1, seconds, 0.0)

    def bin_of(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.floor(np.log(np.maximum(x, self.LOW_S) / self.LOW_S) / self._log_ratio)
        return np.clip(b, 0, self.NBINS - 1).astype(np.int64)

    def flush(self) -> None:
        """Bin the buffered spans: each span's iterations over the bins from its first length's to its last's."""
        if not self.span_counts and not self.grow_counts:
            return
        # fromiter: one pass over the list (asarray walks it twice, for its shape, then its values)
        counts = np.fromiter(self.span_counts, dtype=np.int64, count=len(self.span_counts)).reshape(-1, 2)
        a = np.fromiter(self.span_times, dtype=np.float64, count=len(self.span_times))
        d = np.zeros_like(a)
        if self.grow_counts:
            counts = np.concatenate([counts, np.asarray(self.grow_counts, dtype=np.int64).reshape(-1, 2)])
            grow = np.asarray(self.grow_times, dtype=np.float64).reshape(-1, 2)
            a, d = np.concatenate([a, grow[:, 0]]), np.concatenate([d, grow[:, 1]])
            self.grow_counts.clear()
            self.grow_times.clear()
        self.span_counts.clear()  # the same lists: the recorder appends to them directly
        self.span_times.clear()
        B, k = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
        # a shrinking series holds the same lengths as the growing one from its last term
        neg = d < 0.0
        if neg.any():
            a = np.where(neg, a + d * (k - 1.0), a)
            d = np.abs(d)
        lo = self.bin_of(a)
        m = self.bin_of(a + d * (k - 1.0)) - lo + 1  # bins each span covers
        n = self.NBINS
        if (m == 1).all():  # the common case: every span inside one bin
            w = B * k
            self.counts += np.bincount(lo, weights=w, minlength=n)
            self.sums += np.bincount(lo, weights=w * (a + d * (k - 1.0) * 0.5), minlength=n)
            return
        ends = np.cumsum(m) - 1
        starts = ends - (m - 1)
        span = np.repeat(np.arange(len(m)), m)  # one entry per (span, bin covered)
        bins = lo[span] + (np.arange(len(span)) - starts[span])
        sa, sd, sk = a[span], d[span], k[span]
        # iterations below a bin's upper edge: a + d j < E  <=>  j < (E - a) / d; a span's last bin takes
        # the rest (a span inside one bin, d = 0 included, is all last bin)
        with np.errstate(divide="ignore", invalid="ignore"):
            below = np.clip(np.ceil((self._edges[bins + 1] - sa) / sd), 0.0, sk)
        below[ends] = sk[ends]
        before = np.empty_like(below)
        before[1:] = below[:-1]
        before[starts] = 0.0
        cnt = below - before  # iterations j = before .. below-1 fall in this bin
        w = B[span] * cnt
        self.counts += np.bincount(bins, weights=w, minlength=n)
        self.sums += np.bincount(bins, weights=w * (sa + sd * (before + below - 1.0) * 0.5), minlength=n)

    @property
    def n(self) -> int:
        self.flush()
        return int(self.counts.sum())

    def mean(self) -> float:
        self.flush()
        total = self.counts.sum()
        return float(self.sums.sum() / total) if total else float("nan")

    def percentile(self, q: float) -> float:
        """The nearest-rank q-th percentile (the smallest gap with at least q% of gaps at or below it),
        as the mean of the gaps in its bin."""
        self.flush()
        cum = np.cumsum(self.counts)
        total = cum[-1] if len(cum) else 0.0
        if not total:
            return float("nan")
        rank = max(math.ceil(q / 100.0 * total), 1)
        b = int(np.searchsorted(cum, rank))
        return float(self.sums[b] / self.counts[b])


class HbmSeries:
    """HBM held over simulated time, as snapshots (vLLM logs its KV-cache usage the same way, at an
    interval): one point at most every `interval_s`, the bytes reserved by running turns and the bytes
    cached (reusable KV) at that moment. When `max_points` are held, every other point goes and the
    interval doubles, so a run of any length keeps between max_points/2 and max_points points."""

    def __init__(self, interval_s: float = 1.0, max_points: int = 4096):
        self.interval_s = interval_s
        self.max_points = max(2, max_points)
        self.next_s = -math.inf
        self.t, self.reserved, self.cached = [], [], []

    def sample(self, now: float, reserved: float, cached: float) -> None:
        if now < self.next_s:
            return
        self.t.append(now)
        self.reserved.append(reserved)
        self.cached.append(cached)
        self.next_s = now + self.interval_s
        if len(self.t) >= self.max_points:
            # keep the newest point and every other one before it
            first = (len(self.t) - 1) % 2
            self.t, self.reserved, self.cached = self.t[first::2], self.reserved[first::2], self.cached[first::2]
            self.interval_s *= 2.0
            self.next_s = self.t[-1] + self.interval_s

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"time_s": np.asarray(self.t, dtype=float),
                             "reserved_bytes": np.asarray(self.reserved, dtype=float),
                             "cached_bytes": np.asarray(self.cached, dtype=float)})


_SPAN_FLUSH = GapHistogram.FLUSH


class Recorder:
    """Per-turn columns filled by index (one row per turn), in `array.array`s: a float costs 8 bytes and
    a count 4 (a Python list holds a pointer and a 24-byte float object), and the finished columns
    become numpy arrays without a copy. Each column is read and written through a `memoryview` of its
    array: an array's item assignment parses its value as a call's arguments (`PyArg_Parse`), a view's
    converts it directly, and the engines write about 17 items a turn. Plus the ITL histogram and the HBM
    series, fed by the engine's hooks."""

    COLS = ("arrival_s", "admit_s", "ttft_s", "prefill_start_s", "prefill_s", "load_s", "fetch_wait_s",
            "finish_s", "bytes_loaded", "bytes_saved")
    # token counts and batch sizes: whole numbers below 2^31 (a turn fits the context window), 4 bytes
    INT_COLS = ("history_tokens", "hit_tokens", "computed_tokens", "batch_size", "prompt_tokens", "output_tokens")

    def __init__(self, n, hbm_interval_s: float = 1.0, hbm_max_points: int = 4096):
        self.n = n
        nan = array("d", [float("nan")])
        for c in self.COLS:
            setattr(self, c, memoryview(nan * n))
        for c in self.INT_COLS:
            setattr(self, c, memoryview(array("i", [0]) * n))
        self.hit_tier = memoryview(array("b", [0]) * n)
        self.truncated = memoryview(array("b", [0]) * n)
        self.clipped_tokens = memoryview(array("q", [0]) * n)
        self.preemptions = memoryview(array("q", [0]) * n)  # times the turn was preempted (its KV dropped or swapped)
        self.itl = GapHistogram()
        # the histogram's span buffers: the engine appends a span that follows no stall straight to them
        self.span_counts, self.span_times = self.itl.span_counts, self.itl.span_times
        self.hbm = HbmSeries(hbm_interval_s, hbm_max_points)
        self.hbm_next_s = -math.inf
        # decode stalls not yet followed by a decode iteration: [sequences, extra seconds] groups of the
        # running batch (the first `_covered` of it), and the wait of sequences about to join it
        self._groups = []
        self._covered = 0
        self._joining_s = 0.0
        self.stalled = False  # groups or a joining wait pending: the next span's first iteration differs

    # ---- inter-token gaps --------------------------------------------------------------------
    def decode_span(self, batch: int, k: int, first_s: float, growth_s: float) -> None:
        """k decode iterations of `batch` sequences, iteration j lasting first_s + growth_s * j: each
        sequence gets one token per iteration, so the span adds `batch` gaps of each iteration's length;
        the first iteration's gap of a stalled sequence also holds its stall."""
        counts, times = self.span_counts, self.span_times  # the histogram's buffers (spans of equal iterations)
        if self.stalled:
            self.stalled = False
            if batch > self._covered:  # joined since the last stall: they waited the joining time only
                counts += (batch - self._covered, 1)
                times.append(first_s + self._joining_s)
            for count, extra in self._groups:
                counts += (count, 1)
                times.append(first_s + extra)
            self._groups.clear()
            self._covered = 0
            self._joining_s = 0.0
            if k == 1:
                return
            k -= 1
            first_s += growth_s
        if growth_s:
            self.itl.add_span(batch, k, first_s, growth_s)
        else:
            counts += (batch, k)
            times.append(first_s)

    def flush_spans(self) -> None:
        """Bin the buffered spans once enough have gathered (an engine calls it once per turn, so the
        buffers stay bounded however long the run)."""
        if len(self.span_counts) >= _SPAN_FLUSH:
            self.itl.flush()

    def decode_stall(self, running: int, seconds: float) -> None:
        """The `running` sequences of the batch wait `seconds` before their next token (a synchronous
        save, a prefill iteration), those that joined since the last decode iteration included."""
        if running:
            if running > self._covered:  # they joined after waiting the joining time
                self._groups.append([running - self._covered, self._joining_s])
                self._covered = running
                self._joining_s = 0.0
            for g in self._groups:
                g[1] += seconds
            self.stalled = True
        if len(self.span_counts) >= _SPAN_FLUSH:  # here rather than per span: once per turn is enough
            self.itl.flush()

    def prefill_stall(self, running: int, seconds: float, joining_s: float = 0.0) -> None:
        """A prefill iteration stalls the `running` decoding sequences for `seconds` (its fetch wait,
        compute and any synchronous save); the sequences it admits emit their first token, then wait
        `joining_s` (the synchronous save) before their first decode iteration."""
        if running:
            if running > self._covered:
                self._groups.append([running - self._covered, self._joining_s])
                self._covered = running
            for g in self._groups:
                g[1] += seconds
            self.stalled = True
        self._joining_s = joining_s
        if joining_s:
            self.stalled = True
        if len(self.span_counts) >= _SPAN_FLUSH:
            self.itl.flush()

    # ---- HBM over time -----------------------------------------------------------------------
    def sample_hbm(self, now: float, hbm) -> None:
        """HBM's occupancy at `now` (a `sim.tiers.Tier`: bytes reserved by running turns, bytes cached).
        The engine calls it once `now` reaches `hbm_next_s`."""
        self.hbm.sample(now, hbm.reserved, hbm.used)
        self.hbm_next_s = self.hbm.next_s

    def arrays(self) -> dict:
        """The columns as numpy arrays sharing the recorder's memory (no copy)."""
        out = {c: np.frombuffer(getattr(self, c), dtype=np.float64) for c in self.COLS}
        out.update({c: np.frombuffer(getattr(self, c), dtype=np.int32) for c in self.INT_COLS})
        out["hit_tier"] = np.frombuffer(self.hit_tier, dtype=np.int8)
        out["truncated"] = np.frombuffer(self.truncated, dtype=np.int8).astype(bool)
        out["clipped_tokens"] = np.frombuffer(self.clipped_tokens, dtype=np.int64)
        out["preemptions"] = np.frombuffer(self.preemptions, dtype=np.int64)
        return out


class TurnRows:
    """A finished run's per-turn columns (trace order), turned into DataFrames a range of rows at a time
    so that a long run never holds the whole table twice."""

    def __init__(self, rec: Recorder, wl):
        self.cols = rec.arrays()
        self.session = wl.session
        self.turn = np.asarray(wl.turn)

    def __len__(self) -> int:
        return len(self.turn)

    def table(self, start: int = 0, stop: Optional[int] = None) -> pd.DataFrame:
        stop = len(self) if stop is None else stop
        c = {k: v[start:stop] for k, v in self.cols.items()}
        whole = start == 0 and stop == len(self)
        first_token = c["prefill_start_s"] + c["prefill_s"]
        decode = c["finish_s"] - first_token
        out = c["output_tokens"]
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, decode / (out - 1.0), np.nan)
        return pd.DataFrame({
            "session_id": self.session if whole else self.session[start:stop],
            "turn": self.turn[start:stop],
            "arrival_s": c["arrival_s"],
            "queue_s": c["admit_s"] - c["arrival_s"],
            "fetch_wait_s": c["fetch_wait_s"],
            "load_s": c["load_s"],
            "prefill_s": c["prefill_s"],
            "ttft_s": c["ttft_s"],
            "decode_s": decode,
            "finish_s": c["finish_s"],
            "hit_tier": pd.Categorical.from_codes(c["hit_tier"], TIER_CODES),
            "history_tokens": c["history_tokens"].astype(np.int64),
            "prompt_tokens": c["prompt_tokens"].astype(np.int64),
            "output_tokens": out.astype(np.int64),
            "hit_tokens": c["hit_tokens"].astype(np.int64),
            "computed_tokens": c["computed_tokens"].astype(np.int64),
            "truncated": c["truncated"],  # history dropped or prompt/reply clipped to fit the window
            "clipped_tokens": c["clipped_tokens"],
            "bytes_loaded": c["bytes_loaded"],
            "bytes_saved": c["bytes_saved"],
            "batch_size": c["batch_size"].astype(np.int64),
            # vLLM's per-request metrics: TPOT = (E2E - TTFT) / (output tokens - 1), NaN for one token
            "tpot_s": tpot,
            "e2e_s": c["finish_s"] - c["arrival_s"],
            "preemptions": c["preemptions"],
        })

    def chunks(self, rows: int) -> Iterator[pd.DataFrame]:
        """The table in trace order, `rows` rows at a time (one empty table for an empty run)."""
        n = len(self)
        for start in range(0, max(n, 1), rows):
            yield self.table(start, min(start + rows, n))


def turn_table(rec: Recorder, wl) -> pd.DataFrame:
    return TurnRows(rec, wl).table()


def _pct(x: np.ndarray, q: float) -> float:
    """np.percentile (linear, as vLLM's benchmark) over the values that exist (TPOT: NaN for one token)."""
    x = x[~np.isnan(x)] if x.dtype.kind == "f" else x
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(rows: TurnRows, replica, cfg, slo: GoodputSlo = DEFAULT_SLO) -> dict:
    c = rows.cols
    n = len(rows)
    ttft = c["ttft_s"]
    arrival, finish = c["arrival_s"], c["finish_s"]
    codes = c["hit_tier"]
    by_tier = np.bincount(codes, minlength=len(TIER_CODES)) if n else np.zeros(len(TIER_CODES), np.int64)
    hit_by_tier = np.bincount(codes, weights=c["hit_tokens"], minlength=len(TIER_CODES)) if n else by_tier * 0.0
    n_el = int(n - by_tier[TIER_CODES.index("none")])  # turns with a history to reuse
    ps = getattr(replica, "preemption_stats", None)  # the chunked engine's (prefill-first never preempts)
    start = float(np.nanmin(arrival)) if n else 0.0
    makespan = float(np.nanmax(finish)) - start if n else 0.0
    store = replica.store
    gpu_busy = replica.busy_prefill_s + replica.busy_decode_s + replica.stall_save_s
    ctx_tokens = float(c["history_tokens"].sum() + c["prompt_tokens"].sum())
    # Cost of the work: GPU, DRAM and SSD are bought together, so all of them are charged for the
    # GPU-busy hours this workload needs (what a saturated fleet pays per turn). The provisioned
    # cost charges the same hardware for the whole makespan, idle time included.
    rate = hourly_rate(cfg)  # sim/pricing.py: a policy without a store does not buy DRAM/SSD
    gpu_per_h, storage_per_h = rate.gpu_usd, rate.store_usd
    busy_h = gpu_busy / 3600.0
    gpu_cost = gpu_per_h * busy_h
    storage_cost = storage_per_h * busy_h
    cost = gpu_cost + storage_cost
    # vLLM's per-request latencies (benchmark_serving.py calculate_metrics), one column at a time: a
    # long run holds a few temporaries of 8 bytes a turn, never all of them
    out_tok = c["output_tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = (finish - (c["prefill_start_s"] + c["prefill_s"])) / (out_tok - 1.0)
    tpot[out_tok <= 1] = np.nan
    good = np.ones(n, dtype=bool)
    if slo.ttft_s is not None:
        good &= ttft <= slo.ttft_s
    if slo.tpot_s is not None:
        good &= ~(tpot > slo.tpot_s)  # a one-token reply (NaN) meets any TPOT bound, as in vLLM
    lat = {"tpot_mean_s": float(np.nanmean(tpot)) if (out_tok > 1).any() else float("nan")}
    lat.update({f"tpot_p{q}_s": _pct(tpot, q) for q in (50, 90, 99)})
    del tpot
    e2e = finish - arrival
    if slo.e2e_s is not None:
        good &= e2e <= slo.e2e_s
    lat["e2e_mean_s"] = float(np.mean(e2e)) if n else float("nan")
    lat.update({f"e2e_p{q}_s": _pct(e2e, q) for q in (50, 90, 99)})
    del e2e
    n_good = int(good.sum())
    del good
    queue = c["admit_s"] - arrival
    queue_mean, queue_p99 = float(pd.Series(queue).mean()), _pct(queue, 99)
    del queue
    itl = replica.rec.itl
    el = {name: by_tier[TIER_CODES.index(name)] for name in ("hbm", "dram", "ssd", "miss")}
    out = {
        "name": cfg.name,
        "policy": cfg.policy.kind,
        "model": cfg.model,
        "turns": n,
        "sessions": len(set(rows.session)),
        "makespan_s": makespan,
        "ttft_mean_s": float(np.mean(ttft)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "queue_mean_s": queue_mean,
        "prefill_tokens_per_s": ctx_tokens / replica.busy_prefill_s if replica.busy_prefill_s else 0.0,
        "computed_tokens": int(c["computed_tokens"].sum()),
        "throughput_turns_per_s": n / makespan if makespan > 0 else 0.0,
        "hit_rate_hbm": el["hbm"] / n_el if n_el else 0.0,
        "hit_rate_dram": el["dram"] / n_el if n_el else 0.0,
        "hit_rate_ssd": el["ssd"] / n_el if n_el else 0.0,
        "miss_rate": el["miss"] / n_el if n_el else 0.0,
        # share of the context (history + prompt) whose KV was reused instead of computed
        "reused_token_fraction": float(c["hit_tokens"].sum()) / ctx_tokens if ctx_tokens else 0.0,
        "truncated_turns": int(c["truncated"].sum()),
        "clipped_turns": int((c["clipped_tokens"] > 0).sum()),
        "gpu_busy_s": gpu_busy,
        "gpu_prefill_s": replica.busy_prefill_s,
        "gpu_decode_s": replica.busy_decode_s,
        "save_stall_s": replica.stall_save_s,
        "bytes_h2d": store.h2d.bytes_moved,
        "bytes_d2h": store.d2h.bytes_moved,
        "bytes_ssd_read": store.ssd_r.bytes_moved,
        "bytes_ssd_write": store.ssd_w.bytes_moved,
        # KV held in HBM at most (the chunked engine's block pool, cached blocks included)
        "peak_hbm_bytes": float(getattr(replica, "peak_hbm_bytes", store.hbm.peak)),
        "peak_dram_bytes": store.dram.peak,
        "peak_ssd_bytes": store.ssd.peak,
        "evictions_hbm": store.evictions["hbm"],
        "evictions_dram": store.evictions["dram"],
        "evictions_ssd": store.evictions["ssd"],
        "gpu_cost_usd": gpu_cost,
        "storage_cost_usd": storage_cost,
        "cost_usd": cost,
        "cost_per_1k_turns_usd": 1000.0 * cost / n if n else 0.0,
        "provisioned_cost_usd": (gpu_per_h + storage_per_h) * makespan / HOUR,
        **lat,
        "itl_mean_s": itl.mean(),
        "itl_p50_s": itl.percentile(50),
        "itl_p90_s": itl.percentile(90),
        "itl_p99_s": itl.percentile(99),
        "queue_p99_s": queue_p99,
        "preemptions": int(c["preemptions"].sum()),
        # what preemptions cost (chunked engine): tokens computed again after a recompute preemption,
        # tokens copied out and back by swap preemptions, and the steps' time waiting for those copies
        "preempted_tokens_recomputed": ps.recomputed_tokens if ps else 0,
        "preempted_tokens_swapped": ps.swapped_tokens if ps else 0,
        "preempted_tokens_swapped_in": ps.swapped_in_tokens if ps else 0,
        "swap_wait_s": float(getattr(replica, "swap_wait_s", 0.0)),
        # context tokens reused, by the tier the turn's reused KV came from (its farthest one, for a
        # turn whose prefix blocks sat in several tiers)
        "hit_tokens_hbm": int(hit_by_tier[TIER_CODES.index("hbm")]),
        "hit_tokens_dram": int(hit_by_tier[TIER_CODES.index("dram")]),
        "hit_tokens_ssd": int(hit_by_tier[TIER_CODES.index("ssd")]),
        "goodput_turns_per_s": n_good / makespan if makespan > 0 else 0.0,
    }
    # the bounds that goodput applied
    for name in ("ttft", "tpot", "e2e"):
        bound = getattr(slo, f"{name}_s")
        if bound is not None:
            out[f"goodput_slo_{name}_s"] = float(bound)
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
