"""What a configuration's hardware costs per hour: the one dollar formula of the summary and the planner.

A replica pays for its GPUs, and for the DRAM and SSD of its KV store only when its policy keeps
one. `host.dram_bytes` and `ssd.bytes` size the store (sim/config.py), not the host's own memory,
and `recompute` and `hbm_prefix` never place KV outside HBM: a deployment running them would not
buy the store, so charging them for it would make the baseline pay for hardware it never touches
and flatter reuse. The store is priced as the hardware that reuse adds to a deployment. The prices
are the config's `prices` section.

`sim/metrics.py` charges this rate for the GPU-busy hours (`cost_usd`) and for the makespan
(`provisioned_cost_usd`); `sim/plan.py` ranks candidate capacities by it.
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.units import GB

# Policies whose KV lives in the host DRAM / SSD store as well as in HBM.
STORE_POLICIES = ("attentionstore",)


@dataclass(frozen=True)
class HourlyRate:
    """USD per hour of one replica, split into what the GPUs and the KV store cost."""
    gpu_usd: float
    store_usd: float

    @property
    def total_usd(self) -> float:
        return self.gpu_usd + self.store_usd


def keeps_store(policy_kind: str) -> bool:
    """True when the policy keeps KV in host DRAM / SSD, so the replica buys that store."""
    return policy_kind in STORE_POLICIES


def hourly_rate(cfg) -> HourlyRate:
    """The replica's hourly price at `cfg.prices`: GPUs always, DRAM + SSD only for a store policy."""
    p = cfg.prices
    gpu = cfg.gpu.count * p.gpu_per_hour_usd
    store = ((cfg.host.dram_bytes / GB) * p.dram_per_gb_hour_usd
             + (cfg.ssd.bytes / GB) * p.ssd_per_gb_hour_usd) if keeps_store(cfg.policy.kind) else 0.0
    return HourlyRate(gpu, store)
