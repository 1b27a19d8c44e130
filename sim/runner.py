"""Run one configuration end to end: workload -> replica -> per-turn table + summary -> files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import simpy

from sim.config import Config, config_to_dict
from sim.costmodel import build_cost_model
from sim.engine import ChunkedReplica, Replica
from sim.files import atomic_write, atomic_write_parquet, atomic_write_text
from sim.metrics import DEFAULT_SLO, GoodputSlo, TurnRows, summarize
from sim.workload import Users, Workload, load_workload

# rows of turns.parquet built and written at a time (one parquet row group each): a 10-million-turn
# run never holds its table twice
TURN_CHUNK_ROWS = 1 << 18


@dataclass
class SimResult:
    config: Config
    rows: TurnRows  # the per-turn columns, compact
    summary: dict
    hbm_usage: pd.DataFrame  # time_s, reserved_bytes, cached_bytes, peak_bytes (sim.metrics.HbmSeries)

    @cached_property
    def turns(self) -> pd.DataFrame:
        """The whole per-turn table (built on first use: a long run writes it in chunks instead)."""
        return self.rows.table()


def serve(cfg: Config, workload: Workload):
    """One replica (the config's scheduler kind) serving the workload's users to the last reply; the replica."""
    cost = build_cost_model(cfg)
    env = simpy.Environment()
    replica = (ChunkedReplica if cfg.scheduler.kind == "chunked" else Replica)(env, cfg, cost, workload)
    users = Users(env, workload, replica)
    replica.attach(users)
    env.run(until=users.all_done)
    return replica


def run_simulation(cfg: Config, workload: Workload | None = None, slo: GoodputSlo = DEFAULT_SLO) -> SimResult:
    """`slo`: the per-turn bounds behind `goodput_turns_per_s` (default TTFT <= 2 s, TPOT <= 200 ms)."""
    wl = workload if workload is not None else load_workload(cfg)
    replica = serve(cfg, wl)
    rows = TurnRows(replica.rec, wl)
    return SimResult(cfg, rows, summarize(rows, replica, cfg, slo), replica.rec.hbm.table())


def write_turns_parquet(rows: TurnRows, path, chunk_rows: int = TURN_CHUNK_ROWS) -> Path:
    """turns.parquet in trace order, `chunk_rows` rows per row group, written atomically."""
    def write(tmp):
        writer = None
        try:
            for df in rows.chunks(chunk_rows):
                t = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
    return atomic_write(path, write)


def write_results(result: SimResult, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_turns_parquet(result.rows, out / "turns.parquet")
    atomic_write_parquet(result.hbm_usage, out / "hbm_usage.parquet")
    atomic_write_text(out / "summary.json", json.dumps(result.summary, indent=2))
    atomic_write(out / "summary.csv", lambda p: pd.DataFrame([result.summary]).to_csv(p, index=False))
    atomic_write_text(out / "config.json", json.dumps(config_to_dict(result.config), indent=2))
    return out
