"""The batched executor's runs against the simulator's cost model: per step, and over a whole trace.

Two checks, both needing no SimPy (the GPU image has none):

* `predict_steps`: each measured step (its chunks, decode batch and context, host-loaded tokens, as the
  executor ran them) priced by `cost.iteration` or, for a pure decode step, `cost.decode_span(B, ctx, 1)`
  -- exactly what `sim.engine.ChunkedReplica.serve` charges for that step. Scheduler differences
  cannot enter: the decisions are the executor's.
* `simulate_sessions`: the same trace served by the same loop (`gpu.batched.serve_sessions`, the same
  `ChunkedScheduler`) on a simulated clock that advances by the cost model's price of each step. The
  per-turn TTFT and per-request TPOT it predicts are compared with the measured ones (`compare_turns`).

Each policy is a setting of the simulator (`SIM_OVERRIDES`); the SSD tier's ("ssd") loads and saves go
through the SSD's read and write links as `sim.kvstore.KVStore` moves them (`SsdLinks`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gpu.batched import StepResult, serve_sessions
from sim.scheduler import ChunkedConfig, ChunkedScheduler

# prefix caching off; vLLM's prefix caching; + the host store (DRAM); + the SSD tier with DRAM bypassed
POLICIES = ("recompute", "hbm", "dram", "ssd")
# The simulator's settings (dotted config keys, with `scheduler.kind: chunked`) that serve a trace as each
# policy's runs do: the executor's DRAM store holds every session (no spill), its SSD tier has no DRAM in
# front (every saved history is read back from the SSD, as `gpu.plans.sim_overrides` for the one-turn
# executor's SSD runs), and neither stages a queued request's history ahead of its turn.
SIM_OVERRIDES = {
    "recompute": {"policy.kind": "recompute"},
    "hbm": {"policy.kind": "hbm_prefix"},
    "dram": {"policy.kind": "attentionstore", "policy.scheduler_aware_fetch": False},
    "ssd": {"policy.kind": "attentionstore", "policy.scheduler_aware_fetch": False, "host.dram_bytes": 0},
}


def parse_chunks(s) -> list[tuple[int, int]]:
    if not isinstance(s, str) or not s:
        return []
    return [tuple(int(v) for v in c.split(":")) for c in s.split(";")]


def parse_ext(s) -> list[int]:
    if isinstance(s, (int, float)) and not (isinstance(s, float) and math.isnan(s)):
        return [int(s)]
    if not isinstance(s, str) or not s:
        return []
    return [int(v) for v in s.split(";")]


def step_cost_s(cost, chunks, batch: int, ctx: int, ext: list[int], buffer_layers: int, layerwise: bool,
                ssd_slowdown: float | None = None) -> float:
    """The simulator's price of one step (sim/engine.py ChunkedReplica.serve, its step pricing): host-store loads per
    layer summed over the admitted requests, then one mixed iteration; a step with no chunk and no
    load is a decode step. With `ssd_slowdown` the loads come from the SSD (SSD -> DRAM -> HBM, the
    SSD stage stretched by that factor while writes share the device: `sim.tiers.ssd_read_stage`);
    the wait for reads queued before them is the caller's."""
    L = cost.shape.layers
    per_layer = cost.shape.kv_bytes_per_token / L
    if ssd_slowdown is not None:
        load_layer = sum(cost.history_load_layer_s(0.0, e * per_layer, ssd_slowdown) for e in ext if e)
    else:
        load_layer = sum(cost.history_load_layer_s(e * per_layer) for e in ext if e)
    if chunks or load_layer:
        return cost.iteration(chunks, batch, ctx, load_layer, buffer_layers, layerwise).total_s
    return cost.decode_span(batch, ctx, 1)[0]


def predict_steps(steps: pd.DataFrame, cost, buffer_layers: int = 2, layerwise: bool = True) -> pd.DataFrame:
    """`steps` (the executor's step table) with the cost model's `pred_ms` and the error of the
    measured wall time (`wall_err`) and GPU time (`gpu_err`) against it. A step that read from the SSD
    (`ssd_read_bytes`) is priced with the SSD's links replayed on the measured clock: each step's reads
    queued at its start, the writes its finishes issued at its end (`SsdLinks`); `ssd_wait_ms`, the
    price's wait for reads queued before the step's."""
    ssd = SsdLinks(cost) if "ssd_read_bytes" in steps and (steps.ssd_read_bytes > 0).any() else None
    pred, waits = [], []
    for c, b, x, e, row in zip(steps.chunks, steps.decodes, steps.decode_ctx, steps.ext, steps.itertuples()):
        ext = parse_ext(e)
        wait, slow = 0.0, None
        if ssd is not None:
            if row.ssd_read_bytes > 0:
                wait, slow = ssd.read(row.start_s, sum(ext))
            if row.ssd_write_tokens > 0:
                ssd.write(row.end_s, int(row.ssd_write_tokens))
        pred.append((wait + step_cost_s(cost, parse_chunks(c), int(b), int(x), ext, buffer_layers, layerwise,
                                        slow)) * 1e3)
        waits.append(wait * 1e3)
    out = steps.assign(pred_ms=pred, pred_ssd_wait_ms=waits)
    out["wall_err"] = (out.pred_ms - out.wall_ms) / out.wall_ms
    out["gpu_err"] = (out.pred_ms - out.gpu_ms) / out.gpu_ms.where(out.gpu_ms > 0)
    out["kind"] = np.where(out.chunk_tokens > 0, "mixed", "decode")
    return out


class SimClock:
    """The simulated clock of `simulate_sessions`: moves only by sleeping or by a priced step."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += max(dt, 0.0)


class SsdLinks:
    """The SSD as the simulator's store sees it (`sim.tiers.ssd_links` under the cost model's contention
    mode): reads a step waits for and is slowed by, writes queued by saves. Token counts are priced at
    the cost model's KV bytes per token."""

    def __init__(self, cost):
        from sim.tiers import ssd_links
        self.cost = cost
        self.L = cost.shape.layers
        self.kv = cost.shape.kv_bytes_per_token
        self.r, self.w = ssd_links(cost.ssd_contention)

    def read(self, now: float, tokens: int) -> tuple[float, float]:
        """A step's SSD reads of `tokens` at `now`: (the wait before they start, their slowdown)."""
        from sim.tiers import ssd_read_stage
        start, slow = ssd_read_stage(self.r, self.cost, self.L, now, tokens * self.kv)
        return start - now, slow

    def write(self, now: float, tokens: int) -> float:
        """A save of `tokens` queued at `now` (a request per layer); returns when it ends."""
        nbytes = tokens * self.kv
        return self.w.transfer(now, nbytes, self.cost.ssd_write_bw(nbytes / self.L), self.L)


class CostExecutor:
    """The executor's surface (`gpu.batched.BatchedExecutor`) with no GPU: a step advances the
    simulated clock by the cost model's price; the host store keeps only counts of saved blocks.
    `ssd`: the store is the SSD tier (DRAM bypassed), its reads and writes on `SsdLinks`."""

    def __init__(self, cost, clock: SimClock, block_tokens: int, host: bool, buffer_layers: int = 2,
                 layerwise: bool = True, ssd: bool = False):
        self.cost, self.clock, self.bt = cost, clock, block_tokens
        self.shape = cost.shape
        self.host_k = True if host or ssd else None
        self.has_store = self.host_k is not None
        self.ssd = SsdLinks(cost) if ssd else None
        self.buffer_layers, self.layerwise = buffer_layers, layerwise
        self.tokens, self.session_of, self.host_saved = {}, {}, {}
        self.io = {}

    def add(self, req, token_ids, session=None):
        self.tokens[req] = list(token_ids)
        self.session_of[req] = session

    def forget(self, req):
        self.session_of.pop(req, None)
        return self.tokens.pop(req)

    def open_session(self, session, capacity_tokens):
        self.host_saved[session] = 0

    def external_tokens(self, req, hit_tokens):
        s = self.session_of.get(req)
        return max(self.host_saved.get(s, 0) * self.bt - hit_tokens, 0)

    def save(self, req, blocks, computed_tokens):
        s = self.session_of.get(req)
        a, b = self.host_saved.get(s, 0), computed_tokens // self.bt
        if b <= a:
            return 0
        self.host_saved[s] = b
        n = (b - a) * self.bt
        if self.ssd is not None:
            self.ssd.write(self.clock(), n)
            self._count(ssd_write_tokens=n, ssd_write_bytes=n * self.ssd.kv)
        return n

    def _count(self, **kw):
        for k, v in kw.items():
            self.io[k] = self.io.get(k, 0) + v

    def take_io(self) -> dict:
        out, self.io = self.io, {}
        return out

    def drain(self):
        pass

    def run(self, plan, keep_logits=False) -> StepResult:
        chunks, B, ctx = [], 0, 0
        sampled = {}
        for r, n, dec in plan.scheduled:
            if dec:
                B += 1
                ctx += r.prompt_tokens + r.num_output_tokens
            else:
                chunks.append((n, r.num_computed_tokens))
            if r.num_computed_tokens + n >= r.num_tokens:
                sampled[r] = 0
                self.tokens[r].append(0)
        ext = [e for e in plan.external.values() if e]
        wait, slow = 0.0, None
        if self.ssd is not None and ext:
            wait, slow = self.ssd.read(self.clock(), sum(ext))
            self._count(ssd_read_tokens=sum(ext), ssd_read_bytes=sum(ext) * self.ssd.kv)
        dt = wait + step_cost_s(self.cost, chunks, B, ctx, ext, self.buffer_layers, self.layerwise, slow)
        self.clock.sleep(dt)
        return StepResult(sampled, None, dt * 1e3, 0.0, sum(ext))


def scheduler_for(policy: str, num_blocks: int, block_tokens: int, max_batched_tokens: int, max_seqs: int,
                  max_model_len: int, external_hit=None) -> ChunkedScheduler:
    """The scheduler of a run: prefix caching off for recompute (as the engine runs that policy)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}, expected one of {POLICIES}")
    cfg = ChunkedConfig(num_blocks, max_batched_tokens, max_seqs, block_tokens, max_model_len=max_model_len,
                        prefix_caching=policy != "recompute", pool="exact")  # block ids for the block tables
    return ChunkedScheduler(cfg, external_hit=external_hit if policy in ("dram", "ssd") else None)


def trace_sessions(trace: pd.DataFrame) -> dict:
    """Canonical trace -> `serve_sessions`' input: session -> [(arrival_s, think_s, prompt, output)]."""
    out = {}
    for sid, g in trace.groupby("session_id", sort=False):
        g = g.sort_values("turn")
        out[str(sid)] = [(float(r.arrival_s), float(r.think_s), int(r.prompt_tokens), int(r.output_tokens))
                         for r in g.itertuples()]
    return out


def simulate_sessions(cost, trace: pd.DataFrame, policy: str, num_blocks: int, block_tokens: int = 16,
                      max_batched_tokens: int = 8192, max_seqs: int = 1024, buffer_layers: int = 2,
                      layerwise: bool = True, stop_s: float = math.inf):
    """The trace served by the executor's loop and scheduler on the cost model's clock (until `stop_s`
    on it)."""
    clock = SimClock()
    ex = CostExecutor(cost, clock, block_tokens, policy == "dram", buffer_layers, layerwise, ssd=policy == "ssd")
    sched = scheduler_for(policy, num_blocks, block_tokens, max_batched_tokens, max_seqs,
                          cost.shape.max_context_tokens, ex.external_tokens)
    return serve_sessions(ex, sched, trace_sessions(trace), clock=clock, sleep=clock.sleep, stop_s=stop_s)


def turns_frame(res) -> pd.DataFrame:
    rows = [dict(vars(t), ttft_s=t.ttft_s) for t in res.turns]
    df = pd.DataFrame(rows)
    if len(df):
        df["tpot_s"] = (df.finish_s - df.first_token_s) / (df.output_tokens - 1).where(df.output_tokens > 1)
    return df


def steps_frame(res) -> pd.DataFrame:
    return pd.DataFrame([vars(s) for s in res.steps])


def compare_turns(meas: pd.DataFrame, sim: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per-turn TTFT and per-request TPOT, measured vs simulated (matched by session and turn), and the
    run's summary: MAPEs, mean and p99 TTFT errors, throughput (output tokens over the makespan)."""
    keys = ["session_id", "turn"]
    j = meas.merge(sim[keys + ["ttft_s", "tpot_s", "finish_s"]], on=keys, suffixes=("_meas", "_sim"))
    j["ttft_err"] = (j.ttft_s_sim - j.ttft_s_meas) / j.ttft_s_meas
    j["tpot_err"] = (j.tpot_s_sim - j.tpot_s_meas) / j.tpot_s_meas

    def thr(df, fin):
        span = df[fin].max() - df.arrival_s.min()
        return float(df.output_tokens.sum() / span) if span > 0 else math.nan

    def rel(a, b):
        return float((a - b) / b) if b else math.nan
    # a run cut at its time limit left turns out: the simulated throughput counts the same turns
    m_thr, s_thr = thr(meas, "finish_s"), thr(sim.merge(meas[keys], on=keys), "finish_s")
    summary = {
        "turns_meas": int(len(meas)), "turns_sim": int(len(sim)), "turns_matched": int(len(j)),
        "ttft_mape": float(j.ttft_err.abs().mean()), "tpot_mape": float(j.tpot_err.abs().mean()),
        "ttft_mean_meas_s": float(j.ttft_s_meas.mean()), "ttft_mean_sim_s": float(j.ttft_s_sim.mean()),
        "ttft_mean_err": rel(j.ttft_s_sim.mean(), j.ttft_s_meas.mean()),
        "ttft_p99_meas_s": float(j.ttft_s_meas.quantile(0.99)), "ttft_p99_sim_s": float(j.ttft_s_sim.quantile(0.99)),
        "ttft_p99_err": rel(j.ttft_s_sim.quantile(0.99), j.ttft_s_meas.quantile(0.99)),
        "tpot_mean_meas_s": float(j.tpot_s_meas.mean()), "tpot_mean_sim_s": float(j.tpot_s_sim.mean()),
        "throughput_meas_tok_s": m_thr, "throughput_sim_tok_s": s_thr, "throughput_err": rel(s_thr, m_thr),
    }
    return j, summary


def first_token_steps(turns: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Per turn, the step that gave its first token (the step ending at its first token): `ft_step_s`, its
    time, and `wait_s`, arrival to that step's start (the step in flight when it arrived, earlier chunk
    steps of a long prompt, the queue)."""
    st = steps.sort_values("end_s")
    ends = st.end_s.to_numpy()
    i = np.minimum(np.searchsorted(ends, turns.first_token_s.to_numpy() - 1e-9), len(st) - 1)
    start = st.start_s.to_numpy()[i]
    return pd.DataFrame({"session_id": turns.session_id.to_numpy(), "turn": turns.turn.to_numpy(),
                         "ft_step_s": ends[i] - start, "wait_s": start - turns.arrival_s.to_numpy()})


def phase_summary(meas_turns: pd.DataFrame, meas_steps: pd.DataFrame, sim_turns: pd.DataFrame,
                  sim_steps: pd.DataFrame) -> dict:
    """Where a turn's TTFT error lives: the first-token step's (its price) and the wait before it. A turn
    arriving while a step runs waits for that step's end: a residual of up to one step that depends on
    where the arrival falls among the steps (closed-loop turns arrive a think time after their previous
    reply, so the measured and simulated phases differ turn by turn). `ttft_mape_same_wait`: the TTFT
    error were the simulated turn to wait what the measured one did (its step's error over the measured
    TTFT)."""
    keys = ["session_id", "turn"]
    j = (first_token_steps(meas_turns, meas_steps).merge(first_token_steps(sim_turns, sim_steps), on=keys,
                                                         suffixes=("_meas", "_sim"))
         .merge(meas_turns[keys + ["ttft_s"]], on=keys))
    d = j.ft_step_s_sim - j.ft_step_s_meas
    return {"ft_step_mape": float((d.abs() / j.ft_step_s_meas).mean()),
            "ttft_mape_same_wait": float((d.abs() / j.ttft_s).mean()),
            "wait_mean_meas_s": float(j.wait_s_meas.mean()), "wait_mean_sim_s": float(j.wait_s_sim.mean()),
            "wait_abs_diff_s": float((j.wait_s_sim - j.wait_s_meas).abs().mean())}


def step_summary(pred: pd.DataFrame) -> dict:
    """Per-step errors by kind of step, and the mean running batch weighted by step time."""
    out = {"steps": int(len(pred)),
           "mean_batch": float(((pred.decodes + pred.chunks.fillna("").str.count(":")) * pred.wall_ms).sum()
                               / pred.wall_ms.sum()) if len(pred) else math.nan,
           "preemptions": int(pred.preempted.sum())}
    for kind, g in pred.groupby("kind"):
        out[f"{kind}_steps"] = int(len(g))
        out[f"{kind}_wall_mape"] = float(g.wall_err.abs().mean())
        out[f"{kind}_wall_bias"] = float(g.wall_err.mean())
        out[f"{kind}_gpu_mape"] = float(g.gpu_err.abs().mean())
    out["busy_wall_s"] = float(pred.wall_ms.sum() / 1e3)
    out["busy_pred_s"] = float(pred.pred_ms.sum() / 1e3)
    if "ssd_read_bytes" in pred and (pred.ssd_read_bytes > 0).any():
        g = pred[pred.ssd_read_bytes > 0]
        read_s = (g.ssd_read_ms - g.ssd_wait_ms).sum() / 1e3
        out.update(ssd_steps=int(len(g)), ssd_wall_mape=float(g.wall_err.abs().mean()),
                   ssd_wall_bias=float(g.wall_err.mean()), ssd_read_gb=float(g.ssd_read_bytes.sum() / 1e9),
                   # the reads' own rate: their spans less the waits for a session's write to land
                   ssd_read_gbps=float(g.ssd_read_bytes.sum() / read_s / 1e9) if read_s > 0 else math.nan,
                   ssd_wait_ms=float(g.ssd_wait_ms.sum()), ssd_pred_wait_ms=float(g.pred_ssd_wait_ms.sum()),
                   ssd_write_gb=float(pred.ssd_write_bytes.sum() / 1e9))
    return out


def scatter_plot(joined: dict, path, title: str) -> None:
    """Simulated against measured per-turn TTFT and per-request TPOT, one row of two panels a run.
    `joined`: run -> (the per-turn frame of `compare_turns`, a label for the run's panels). The figure's
    title names the call, GPU and model; each panel its run, policy, load and MAPE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    runs = list(joined)
    fig, axes = plt.subplots(len(runs), 2, figsize=(8.5, 2.7 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        j, label = joined[run]
        for ax, col, name in ((row[0], "ttft", "TTFT"), (row[1], "tpot", "TPOT")):
            x, y = j[f"{col}_s_meas"] * 1e3, j[f"{col}_s_sim"] * 1e3
            ok = (x > 0) & (y > 0)
            x, y = x[ok], y[ok]
            if len(x):
                lo, hi = min(x.min(), y.min()) * 0.8, max(x.max(), y.max()) * 1.25
                ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.8)
                ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.85", lw=0,
                                label="±10%")
                ax.scatter(x, y, s=9, alpha=0.7)
                ax.set_xscale("log")
                ax.set_yscale("log")
                for axis in (ax.xaxis, ax.yaxis):  # plain milliseconds, no crowded minor labels
                    axis.set_major_formatter(ScalarFormatter())
                    axis.set_minor_formatter(NullFormatter())
                mape = float(((y - x).abs() / x).mean())
                ax.set_title(f"{label}\n{name} MAPE {100 * mape:.1f}% ({len(x)} {'turns' if col == 'ttft' else 'requests'})",
                             fontsize=8)
            ax.set_xlabel(f"measured {name} (ms)", fontsize=8)
            ax.set_ylabel(f"simulated {name} (ms)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(runs)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def csv_path(folder, name: str):
    """A run folder's table: `name`, or its gzipped copy (committed runs keep large tables gzipped so the
    repository stays small enough to travel to the device machines)."""
    from pathlib import Path
    p = Path(folder) / name
    if p.exists() or not (gz := p.with_name(name + ".gz")).exists():
        return p
    return gz
