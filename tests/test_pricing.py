"""The one dollar formula: GPUs always, the DRAM/SSD store only for a policy that keeps one."""
import pytest

from sim.config import load_config
from sim.plan import provisioned_usd_per_hour
from sim.pricing import hourly_rate

# 2 GPUs at $3.67/h; 128 GB DRAM at $0.0044/GB.h = $0.5632/h; 2.5 TB SSD at $0.00011/GB.h = $0.275/h
_SET = {"gpu.count": 2, "host.dram_bytes": "128GB", "ssd.bytes": "2.5TB", "prices.gpu_per_hour_usd": 3.67,
        "prices.dram_per_gb_hour_usd": 0.0044, "prices.ssd_per_gb_hour_usd": 0.00011, "model": "llama2-7b"}


def test_a_store_policy_pays_for_gpus_dram_and_ssd():
    rate = hourly_rate(load_config({**_base(), "policy": {"kind": "attentionstore"}}, _SET))
    assert rate.gpu_usd == pytest.approx(7.34) and rate.store_usd == pytest.approx(0.8382)
    assert rate.total_usd == pytest.approx(8.1782)


@pytest.mark.parametrize("kind", ["recompute", "hbm_prefix"])
def test_a_policy_without_a_store_does_not_buy_dram_or_ssd(kind):
    cfg = load_config({**_base(), "policy": {"kind": kind}}, _SET)
    assert hourly_rate(cfg).store_usd == 0.0
    # the planner ranks by the same formula the run summary charges
    assert provisioned_usd_per_hour(cfg) == pytest.approx(7.34)


def _base():
    return {"workload": {"synthetic": {"n_sessions": 2}}}
