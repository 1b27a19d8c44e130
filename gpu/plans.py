"""Run plans: how the GPU executor serves a run, and the simulator settings that describe the same run.

One table, read by the isolated-turn grid (`gpu/isolated.py`), the device script
(`bench/gpu_device_run.py`) and the validation (`gpu/validate.py`), so a run named `dram_overlap` is the
same thing on the GPU and in the simulator.
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.errors import KvsimError
from sim.models import READ_BUFFER_LAYERS

TIERS = ("recompute", "hbm", "dram", "ssd")


@dataclass(frozen=True)
class ServePlan:
    """How the executor gets every turn's history KV (CachedAttention §3.1-3.2)."""
    tier: str                      # one of TIERS
    overlap: bool = True           # layer-wise preload (True) or load all layers, then compute
    read_buffer_layers: int = READ_BUFFER_LAYERS   # N: layers loaded ahead of the compute
    async_save: bool = True        # False: the turn waits for its save before it ends

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ValueError(f"tier {self.tier!r}, expected one of {TIERS}")
        if self.read_buffer_layers < 1:
            raise ValueError("read_buffer_layers must be >= 1")


# run name -> executor plan. The isolated-turn grid serves all of them, in this order.
PLANS = {
    "recompute": ServePlan("recompute"),
    "hbm": ServePlan("hbm"),
    "dram_sync": ServePlan("dram", overlap=False),
    "dram_overlap": ServePlan("dram", overlap=True),
    "ssd_sync": ServePlan("ssd", overlap=False),
    "ssd_overlap": ServePlan("ssd", overlap=True),
}

# Trace runs the validation replays in the simulator (`kvsim gpu validate`), in the device script's order.
TRACE_RUNS = ("dram_overlap", "recompute", "ssd_overlap", "dram_sync")


def run_name(plan: ServePlan) -> str:
    """The table's name of `plan` (`dram_overlap`, `recompute`, ...), as the executor's per-turn rows carry it."""
    if plan.tier in ("recompute", "hbm"):
        return plan.tier
    return f"{plan.tier}_{'overlap' if plan.overlap else 'sync'}"


def sim_overrides(run: str) -> dict:
    """Config overrides (dotted keys) under which the simulator serves turns as run `run` does.

    `scheduler_aware_fetch` stays off (set by the validation's base config): the executor does not
    prefetch from SSD ahead of a turn. An SSD run has no DRAM tier, so every reused turn reads the SSD.
    """
    plan = PLANS.get(run)
    if plan is None or plan.tier == "hbm":
        raise KvsimError(f"run {run!r}: expected one of {', '.join(n for n in PLANS if PLANS[n].tier != 'hbm')}")
    if plan.tier == "recompute":
        return {"policy.kind": "recompute"}
    over = {"policy.kind": "attentionstore", "policy.layerwise_preload": plan.overlap,
            "policy.read_buffer_layers": plan.read_buffer_layers}
    if plan.tier == "ssd":
        over["host.dram_bytes"] = 0
    return over
