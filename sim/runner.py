"""Run one configuration end to end: workload -> replica -> per-turn table + summary -> files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import simpy

from sim.config import Config, config_to_dict
from sim.costmodel import build_cost_model
from sim.engine import ChunkedReplica, Replica
from sim.metrics import summarize, turn_table
from sim.workload import Users, Workload, load_workload


@dataclass
class SimResult:
    config: Config
    turns: pd.DataFrame
    summary: dict


def run_simulation(cfg: Config, workload: Workload | None = None) -> SimResult:
    cost = build_cost_model(cfg)
    wl = workload if workload is not None else load_workload(cfg)
    env = simpy.Environment()
    replica = (ChunkedReplica if cfg.scheduler.kind == "chunked" else Replica)(env, cfg, cost, wl)
    users = Users(env, wl, replica)
    replica.attach(users)
    env.run(until=users.all_done)
    df = turn_table(replica.rec, wl)
    return SimResult(cfg, df, summarize(df, replica, cfg))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)


def write_results(result: SimResult, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "turns.parquet", lambda p: result.turns.to_parquet(p, index=False))
    _atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(result.summary, indent=2)))
    _atomic_write(out / "summary.csv", lambda p: pd.DataFrame([result.summary]).to_csv(p, index=False))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config_to_dict(result.config), indent=2)))
    return out
