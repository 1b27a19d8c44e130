"""The roofline's measured efficiencies (sim/efficiency.py) and their use in RooflineCost."""
import importlib.util
import math
from pathlib import Path

import pytest

from sim.config import load_config
from sim.costmodel import RooflineCost, build_cost_model
from sim.efficiency import H100, RooflineEfficiency
from sim.models import MODELS

ROOT = Path(__file__).resolve().parent.parent


def _eff(**kw):
    base = dict(tokens=(1, 100), gemm_flops=(0.2, 0.8), gemm_bw=(0.5, 0.9), attention_flops=0.25, kv_bw=1.0,
                act_passes=1.0, layer_fixed_s=1e-5)
    return RooflineEfficiency(**{**base, **kw})


def test_gemm_fractions_interpolate_in_log_tokens_and_clamp_outside_the_sweep():
    e = _eff()
    # 10 rows sit halfway between 1 and 100 in log: halfway between the fractions
    assert e.gemm_fractions(10) == pytest.approx((0.5, 0.7))
    assert e.gemm_fractions(0.5) == (0.2, 0.5)
    assert e.gemm_fractions(1e6) == (0.8, 0.9)


def test_a_gemm_takes_the_slower_of_its_compute_and_memory_sides():
    e = _eff()
    # 1 TFLOP at 1 PF/s x 0.5 = 2 ms; 1 GB at 1 TB/s x 0.7 = 1.43 ms
    assert e.gemm_s(1e12, 1e9, 10, 1e15, 1e12) == pytest.approx(2e-3)
    assert e.gemm_s(1e9, 1e9, 10, 1e15, 1e12) == pytest.approx(1e9 / 0.7e12)


def test_measured_prefill_layer_sums_gemms_attention_and_the_other_kernels():
    """LLaMA-2-7B, 1,000 new tokens after 3,000, on 100 TF/s and 2,000 GB/s: GEMMs at 1,000 rows (0.8 of
    peak, compute-bound), attention at 0.25 of peak (compute-bound), one pass over 4,096 + 11,008 bf16
    activations per token at full bandwidth, 10 us floor."""
    m = MODELS["llama2-7b"]
    c = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff())
    P = m.params_per_layer
    gemm = 2 * P * 1000 / (100e12 * 0.8)
    attn = 4 * 4096 * 1000 * (3000 + 1001 / 2) / (100e12 * 0.25)
    act = 1000 * 2 * (4096 + 11008) / 2000e9
    assert c.prefill_layer_s(1000, 3000) == pytest.approx(gemm + attn + act + 1e-5, rel=1e-12)


def test_measured_decode_step_reads_weights_at_the_gemm_share_and_kv_at_its_own():
    """8 sequences holding 8,000 tokens: GEMMs memory-bound at 8 rows (bandwidth share 0.5 + 0.4 x
    log 8 / log 100), KV at full bandwidth; the LM head is a GEMM over the 8 rows."""
    m = MODELS["llama2-7b"]
    c = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff())
    bw = 0.5 + 0.4 * math.log(8) / math.log(100)
    layer = (m.params_per_layer * 2 / (2000e9 * bw) + 8000 * m.kv_bytes_per_token_layer / 2000e9
             + 8 * 2 * (4096 + 11008) / 2000e9 + 1e-5)
    head = m.vocab * m.hidden * 2 / (2000e9 * bw)
    assert c.decode_step_s(8, 8000) == pytest.approx(32 * layer + head, rel=1e-12)
    # linear in the context for a fixed batch: the span's closed form needs no kink
    assert c.decode_next_kink(8, 8000) == math.inf
    t, k = c.decode_span(8, 8000, 10)
    assert t == pytest.approx(sum(c.decode_step_s(8, 8000 + 8 * i) for i in range(10)), rel=1e-12)


def test_gpu_efficiency_constant_is_the_old_roofline_and_measured_is_the_default():
    base = {"model": "llama2-13b", "gpu": {"name": "h100-80gb"}}
    const = build_cost_model(load_config({**base, "gpu": {"name": "h100-80gb", "efficiency": "constant"}}))
    old = RooflineCost(MODELS["llama2-13b"], 1, 989e12, 3350.0, 0.55, 0.75, 25, 25, 6, 3)
    assert const.prefill_layer_s(512, 1024) == old.prefill_layer_s(512, 1024)
    assert const.decode_step_s(16, 16000) == old.decode_step_s(16, 16000)
    measured = build_cost_model(load_config(base))
    assert measured._eff is H100
    assert measured.prefill_layer_s(512, 1024) != old.prefill_layer_s(512, 1024)


def test_the_committed_h100_table_is_what_the_fit_derives_from_the_gemm_sweep():
    spec = importlib.util.spec_from_file_location("roofline_vs_measured", ROOT / "bench/roofline_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = mod.gemm_table()
    assert (H100.tokens, H100.gemm_flops, H100.gemm_bw) == (t["tokens"], t["gemm_flops"], t["gemm_bw"])
    assert H100.layer_fixed_s == mod.layer_floor_s()


def test_a_measured_mixed_iteration_reads_the_weights_once_and_matches_prefill_and_decode_alone():
    """With measured efficiencies too, one layer over a chunk and decodes is one forward pass whose GEMMs
    run over all 544 tokens; alone, the chunk and the decodes reproduce the prefill and decode times."""
    cm = build_cost_model(load_config({}, {"model": "llama2-7b"}))
    s = cm.shape
    e = H100
    gemm = e.gemm_s(2 * s.params_per_layer * 544, 2 * s.params_per_layer, 544, 312e12, 2039e9)
    pairs = 512 * (1000 + 256.5) + 48000
    kv = s.kv_bytes_per_token_layer * (1000 + 2 * 512 + 48000)
    attn = max(4 * s.hidden * pairs / (312e12 * e.attention_flops), kv / (2039e9 * e.kv_bw))
    act = 544 * e.act_bytes_per_token(s, 1) / 2039e9
    assert cm.mixed_layer_s([(512, 1000)], 32, 48000) == pytest.approx(gemm + attn + act + e.layer_fixed_s,
                                                                       rel=1e-12)
    assert cm.mixed_layer_s([(512, 1000)], 0, 0.0) == pytest.approx(cm.prefill_layer_s(512, 1000), rel=1e-12)
    assert (cm.mixed_layer_s([], 32, 48000) * s.layers + cm.decode_head_s(32)
            == pytest.approx(cm.decode_step_s(32, 48000), rel=1e-12))
