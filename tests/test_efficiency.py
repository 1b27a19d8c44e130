"""The roofline's measured efficiencies (sim/efficiency.py) and their use in RooflineCost."""
import math
from pathlib import Path

import pytest

from sim.config import load_config
from sim.costmodel import RooflineCost, build_cost_model
from sim.efficiency import H100, RooflineEfficiency
from sim.errors import KvsimError
from sim.models import MODELS

from bench_modules import load_bench

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
    peak, compute-bound), attention at 0.25 of peak (compute-bound) over 1,024 query rows (16 whole tiles
    of 64), one pass over 4,096 + 11,008 bf16 activations per token at full bandwidth, 10 us floor."""
    m = MODELS["llama2-7b"]
    c = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff())
    P = m.params_per_layer
    gemm = 2 * P * 1000 / (100e12 * 0.8)
    attn = 4 * 4096 * 1024 * (3000 + 1001 / 2) / (100e12 * 0.25)
    act = 1000 * 2 * (4096 + 11008) / 2000e9
    assert c.prefill_layer_s(1000, 3000) == pytest.approx(gemm + attn + act + 1e-5, rel=1e-12)


def test_measured_decode_step_reads_weights_at_the_gemm_share_and_kv_at_its_own():
    """8 sequences holding 8,000 tokens: GEMMs memory-bound at 8 rows (bandwidth share 0.5 + 0.4 x
    log 8 / log 100) over the weights and their activations (8 x 65,792 bf16 elements), plus four
    kernels' 2 us; KV at full bandwidth; the LM head is one GEMM over the 8 rows."""
    m = MODELS["llama2-7b"]
    c = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff(gemm_fixed_s=2e-6))
    bw = 0.5 + 0.4 * math.log(8) / math.log(100)
    layer = ((m.params_per_layer * 2 + 8 * 65792 * 2) / (2000e9 * bw) + 4 * 2e-6
             + 8000 * m.kv_bytes_per_token_layer / 2000e9 + 8 * 2 * (4096 + 11008) / 2000e9 + 1e-5)
    head = m.vocab * m.hidden * 2 / (2000e9 * bw) + 2e-6
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
    mod = load_bench("roofline_vs_measured")
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


def test_a_gemm_kernels_fixed_time_is_on_its_memory_side_only():
    e = _eff(gemm_fixed_s=3e-6)
    # 1 GB at 1 TB/s x 0.7 = 1.43 ms plus four kernels' 3 us; 1 TFLOP at 1 PF/s x 0.5 = 2 ms takes none
    assert e.gemm_s(1e9, 1e9, 10, 1e15, 1e12, 4) == pytest.approx(1e9 / 0.7e12 + 12e-6)
    assert e.gemm_s(1e12, 1e9, 10, 1e15, 1e12, 4) == pytest.approx(2e-3)


def test_gemm_activations_are_each_matrixs_rows_in_and_out_on_one_gpu():
    from sim.efficiency import gemm_act_bytes_per_token
    # LLaMA-2-7B: qkv 4,096 + 12,288, o 4,096 + 4,096, gate_up 4,096 + 22,016, down 11,008 + 4,096
    assert gemm_act_bytes_per_token(MODELS["llama2-7b"], 1) == 2 * 65792
    # Llama-3.1-70B on 4 GPUs: the hidden state (8,192) in and out everywhere, the rest a quarter:
    # 4 x 8,192 + (2 x 8,192 + 2 x 1,024 + 3 x 28,672) / 4
    assert gemm_act_bytes_per_token(MODELS["llama3.1-70b"], 4) == 2 * (32768 + (16384 + 2048 + 86016) / 4)


def test_flash_attention_computes_whole_query_tiles_and_one_query_as_it_is():
    e = _eff()
    assert (e.padded_rows(1), e.padded_rows(16), e.padded_rows(64), e.padded_rows(65)) == (1, 64, 64, 128)
    # LLaMA-2-7B, 16 new tokens after 8,192 on 100 TF/s: the 64-row tile's pairs at 0.25 of peak (4x the
    # 16 rows'), above the KV read (8,224 tokens x 16 KiB at 2,000 GB/s = 67 us)
    m = MODELS["llama2-7b"]
    c = RooflineCost(m, 1, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e)
    attn = 4 * 4096 * 64 * (8192 + 17 / 2) / (100e12 * 0.25)
    assert attn > 8224 * 16384 / 2000e9
    rest = c.prefill_layer_s(16, 0) - 4 * 4096 * 64 * (17 / 2) / (100e12 * 0.25)
    assert c.prefill_layer_s(16, 8192) == pytest.approx(rest + attn, rel=1e-12)


def test_masked_attention_is_waves_of_blocks_walking_every_key():
    """slots = 2 x 132 blocks; a wave walks a key in 264 x 64 x 4 x 128 / (1 PF/s x 0.3) = 28.84 ns."""
    e = _eff(masked_flops=0.3, masked_lone=0.8)
    key = 264 * 64 * 4 * 128 / (1e15 * 0.3)
    assert key == pytest.approx(2.883584e-8)
    # MHA, 32 heads, 16 new tokens: 32 blocks, at most one per SM: 0.8 of a wave over 8,192 keys
    assert e.masked_attention_s(128, 32, 32, 16, 8176, 1e15, 132) == pytest.approx(0.8 * 8192 * key)
    # 768 new tokens: 32 x 12 = 384 blocks, two waves of 264
    assert e.masked_attention_s(128, 32, 32, 768, 7424, 1e15, 132) == pytest.approx(2 * 8192 * key)
    # GQA, 32 query heads over 8 KV heads: the 4 x 16 rows of a KV head fill one tile, 8 blocks: the
    # same walk as 32 MHA blocks although the KV is a quarter
    assert e.masked_attention_s(128, 32, 8, 16, 8176, 1e15, 132) == pytest.approx(0.8 * 8192 * key)
    # 132 SMs hold 132 lone blocks; one more puts two on an SM: a full wave
    assert e.masked_attention_s(128, 132, 132, 64, 936, 1e15, 132) == pytest.approx(0.8 * 1000 * key)
    assert e.masked_attention_s(128, 133, 133, 64, 936, 1e15, 132) == pytest.approx(1000 * key)


def test_the_masked_roofline_prices_a_prefill_after_history_with_the_masked_kernel_and_without_as_flash():
    """LLaMA-2-7B on 1 PF/s, 2,000 GB/s, 132 SMs: after 8,176 tokens, 16 new ones pay the GEMMs plus the
    masked kernel's walk (0.8 x 8,192 keys x 28.84 ns = 189 us, above the 134.7 us KV read at
    kv_bw 1.0) plus its 20 us; with no history the executor runs causal flash, as the default does."""
    m = MODELS["llama2-7b"]
    e = _eff(masked_flops=0.3, masked_lone=0.8, masked_fixed_s=20e-6)
    masked = RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e, attention="masked", sms=132)
    flash = RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e)
    walk = 0.8 * 8192 * 264 * 64 * 4 * 128 / (1e15 * 0.3)
    kv = 16384 * (8176 + 32) / 2000e9
    assert walk > kv
    # with no history flash's attention is its KV side (32 tokens), the rest is GEMMs and other kernels
    gemms = flash.prefill_layer_s(16, 0) - max(4 * 4096 * 64 * (17 / 2) / (1e15 * 0.25), 16384 * 32 / 2000e9)
    assert masked.prefill_layer_s(16, 8176) == pytest.approx(gemms + walk + 20e-6, rel=1e-12)
    assert masked.prefill_layer_s(16, 0) == flash.prefill_layer_s(16, 0)
    # mixed steps are the batched executor's flash kernel either way
    assert masked.mixed_layer_s([(16, 8176)], 0, 0.0) == flash.mixed_layer_s([(16, 8176)], 0, 0.0)


def test_the_masked_decode_folds_a_kv_heads_query_group_into_one_block_per_sequence():
    """The executor's decode graphs (attention "masked"), Llama-3.1-8B (32 query heads over 8 KV heads) on
    1 PF/s, 2,000 GB/s, 132 SMs. 4 sequences of 8,192 tokens: 4 x 8 blocks of 4 rows, at most one per
    SM: 0.8 x 8,192 keys x 28.84 ns = 189 us a layer, above the KV read (32,768 tokens x 4 KiB at
    2,000 GB/s = 67.1 us) that flash pays; no fixed term (a one-row mask). 64 sequences: 512 blocks, two
    waves (472 us), below their 1,074 us KV read: KV-bound as flash. LLaMA-2-7B (MHA, one row a head)
    decodes as flash."""
    e = _eff(masked_flops=0.3, masked_lone=0.8, masked_fixed_s=20e-6)
    key = 264 * 64 * 4 * 128 / (1e15 * 0.3)
    assert e.masked_attention_s(128, 32, 8, 1, 8191, 1e15, 132, seqs=4) == pytest.approx(0.8 * 8192 * key)
    assert e.masked_attention_s(128, 32, 8, 1, 8191, 1e15, 132, seqs=64) == pytest.approx(2 * 8192 * key)
    m = MODELS["llama3.1-8b"]
    masked = RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e, attention="masked", sms=132)
    flash = RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e)
    walk, kv = 0.8 * 8192 * key, 4 * 8192 * 4096 / 2000e9
    assert kv == pytest.approx(67.108864e-6) and walk > kv
    assert masked.decode_step_s(4, 4 * 8192) == pytest.approx(flash.decode_step_s(4, 4 * 8192) + 32 * (walk - kv),
                                                               rel=1e-12)
    assert 2 * 8192 * key < 64 * 8192 * 4096 / 2000e9
    assert masked.decode_step_s(64, 64 * 8192) == pytest.approx(flash.decode_step_s(64, 64 * 8192), rel=1e-12)
    assert masked.decode_step_s(4, 0.0) == pytest.approx(flash.decode_step_s(4, 0.0), rel=1e-12)
    mha = MODELS["llama2-7b"]
    assert (RooflineCost(mha, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e, attention="masked",
                         sms=132).decode_step_s(4, 4 * 8192)
            == RooflineCost(mha, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e).decode_step_s(4, 4 * 8192))


def test_the_masked_kernel_needs_measured_efficiencies_and_the_sm_count():
    m = MODELS["llama2-7b"]
    with pytest.raises(KvsimError, match="masked"):
        RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff(), attention="masked")
    with pytest.raises(KvsimError, match="masked"):
        RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, attention="masked", sms=132)
    with pytest.raises(KvsimError, match="expected 'flash' or 'masked'"):
        RooflineCost(m, 1, 1e15, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=_eff(), attention="paged")


def test_the_committed_h100_table_is_what_the_whole_fit_derives():
    mod = load_bench("roofline_vs_measured")
    fitted = mod.fit(mod.measured_points())
    keys = ("attention_flops", "kv_bw", "act_passes", "masked_flops", "masked_lone", "masked_fixed_s",
            "gemm_fixed_s", "gemm_flops", "gemm_bw")
    assert {k: getattr(H100, k) for k in keys} == {k: getattr(fitted, k) for k in keys}


def test_tensor_parallel_gemms_cost_one_gpus_shard_of_weights_and_its_own_activations():
    """LLaMA-2-7B at TP 2 on 100 TF/s and 2,000 GB/s a GPU, 8 tokens (memory-bound: 0.5 of bandwidth at that
    row count): each GPU reads half of the layer's weights and moves its own activations (the replicated
    hidden state in and out, its half of q, k, v, o and the MLP) over its own 2,000 GB/s, plus 4 kernels'
    fixed time. Pricing over the pooled 4,000 GB/s must count both GPUs' activations, not one's."""
    from sim.efficiency import gemm_act_bytes_per_token
    m = MODELS["llama2-7b"]
    e = _eff(tokens=(1, 100), gemm_bw=(0.5, 0.5), gemm_fixed_s=2e-6)
    c = RooflineCost(m, 2, 100e12, 2000, 0.5, 0.5, 25, 25, 5, 3, efficiency=e)
    w = m.params_per_layer * 2 / 2                          # one GPU's half of the bf16 weights
    act = 8 * gemm_act_bytes_per_token(m, 2)                # one GPU's activations for 8 tokens
    assert act == 8 * 2 * (4 * 4096 + (2 * 4096 + 2 * 4096 + 3 * 11008) / 2)
    mem = (w + act) / (2000e9 * 0.5) + 4 * 2e-6
    comp = 2 * m.params_per_layer * 8 / 2 / (100e12 * e.gemm_fractions(8)[0])
    assert mem > comp
    assert c._gemms_s(8) == pytest.approx(mem + e.layer_fixed_s + 8 * c._act_tok_s, rel=1e-12)
