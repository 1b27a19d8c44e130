"""Model shapes: KV bytes by attention kind, all vs active parameters, experts touched, against
numbers computed by hand from each model's published config (sources in sim/models.py)."""
import dataclasses
from pathlib import Path

import pytest

from sim.config import load_config
from sim.models import GPUS, MODELS, ModelShape


def test_llama31_8b_gqa_caches_8_kv_heads_of_128_per_layer():
    m = MODELS["llama3.1-8b"]
    # K and V x 8 KV heads x 128 dims x 2 bytes = 4,096 B per layer (2,048 each for K and V)
    assert m.kv_bytes_per_token_layer == 4096
    assert m.kv_bytes_per_token == 32 * 4096 == 131072
    assert m.attention == "gqa"


def test_fp8_kv_halves_the_cache():
    m = dataclasses.replace(MODELS["llama3.1-8b"], kv_dtype_bytes=1)
    assert m.kv_bytes_per_token == 65536
    assert m.weight_bytes == MODELS["llama3.1-8b"].weight_bytes  # weights stay bf16


def test_deepseek_v3_mla_caches_one_latent_plus_the_rope_key():
    m = MODELS["deepseek-v3"]
    # (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 bytes, shared by the 128 heads
    assert m.attention == "mla"
    assert m.kv_bytes_per_token_layer == 576 * 2 == 1152
    assert m.kv_bytes_per_token == 61 * 1152 == 70272
    # the same heads as MHA would cache 2 x 128 x (128 + 64) x 2 = 98,304 B per layer: 85x more
    assert 2 * 128 * 192 * 2 / m.kv_bytes_per_token_layer > 85


def test_head_dim_comes_from_the_config_not_hidden_over_heads():
    m = MODELS["qwen3-32b"]
    assert m.hidden // m.heads == 80 and m.head_dim == 128
    assert m.kv_bytes_per_token_layer == 2 * 8 * 128 * 2
    # q projects to 64 x 128 = 8192 and back: 5120*8192 + 2*5120*1024 + 8192*5120
    assert m.attn_params_per_layer == 94371840


def test_gpt_oss_sliding_layers_hold_at_most_their_window():
    m = MODELS["gpt-oss-120b"]
    per_layer = 2 * 8 * 64 * 2
    assert m.kv_bytes_per_token_layer == per_layer == 2048
    assert m.sliding_layers == 18                     # even layers of 36 slide, odd ones attend all
    # inside the window every layer holds every token
    assert m.kv_bytes(100) == 36 * 100 * 2048 == 7372800
    # 10,000 tokens: 18 full layers hold 10,000, 18 sliding layers 128
    assert m.kv_bytes(10_000) == 2048 * (18 * 10_000 + 18 * 128) == 373358592
    assert m.kv_bytes(10_000) < m.kv_bytes_per_token * 10_000 / 1.9


def test_mixtral_active_and_total_parameters_match_the_published_ones():
    m = MODELS["mixtral-8x7b"]
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024          # q, o and the 8-head k, v
    expert = 3 * 4096 * 14336
    router = 4096 * 8
    embed = 2 * 32000 * 4096
    assert m.total_params == 32 * (attn + 8 * expert + router) + embed == 46702526464
    assert m.active_params == 32 * (attn + 2 * expert + router) + embed == 12879659008
    assert abs(m.total_params / 46.7e9 - 1) < 0.01 and abs(m.active_params / 12.9e9 - 1) < 0.01


def test_deepseek_v3_counts_671b_weights_and_37b_active():
    m = MODELS["deepseek-v3"]
    assert abs(m.total_params / 671e9 - 1) < 0.01
    assert abs(m.active_params / 37e9 - 1) < 0.02
    assert m.weight_bytes == m.total_params  # the fp8 checkpoint: one byte a weight


def test_gpt_oss_120b_mxfp4_experts_fit_one_80gb_gpu():
    m = MODELS["gpt-oss-120b"]
    routed = 36 * 128 * 3 * 2880 * 2880
    assert m.routed_expert_params == routed == 114661785600
    assert m.total_params == 116788838400                    # the README's "117B"
    # the rest in bf16, the experts at 4.25 bits
    assert m.weight_bytes == (116788838400 - routed) * 2 + routed * 17 / 32 == 65168179200
    assert m.weight_bytes < 80e9


def test_expected_distinct_experts_touched_by_a_batch():
    m = MODELS["mixtral-8x7b"]
    assert m.experts_touched(1) == pytest.approx(2.0)          # one token: its top-2
    assert m.experts_touched(2) == pytest.approx(8 * (1 - 0.75 ** 2)) == 3.5
    assert m.experts_touched(1000) == pytest.approx(8.0)
    assert MODELS["llama3.1-8b"].experts_touched(64) == 0.0
    # DeepSeek-V3, 64 tokens choosing 8 of 256: 256 (1 - (31/32)^64)
    assert MODELS["deepseek-v3"].experts_touched(64) == pytest.approx(222.44, abs=0.01)


def test_llama2_era_shapes_keep_their_numbers():
    m = MODELS["llama2-7b"]
    assert (m.head_dim, m.attention, m.kv_bytes_per_token_layer) == (128, "mha", 2 * 32 * 128 * 2)
    assert m.params_per_layer == 4 * 4096 * 4096 + 3 * 4096 * 11008 == 202375168
    assert m.weight_bytes == (32 * 202375168 + 2 * 32000 * 4096) * 2 == 13476298752
    assert MODELS["falcon-40b"].kv_bytes(10_000) == MODELS["falcon-40b"].kv_bytes_per_token * 10_000


def test_a_copy_with_another_dtype_follows_it_unless_the_kv_dtype_is_set():
    f32 = dataclasses.replace(MODELS["llama2-7b"], dtype_bytes=4)
    assert f32.kv_bytes_per_token_layer == 2 * 32 * 128 * 4
    ds = dataclasses.replace(MODELS["deepseek-v3"], dtype_bytes=2)
    assert ds.kv_bytes_per_token_layer == 1152


def test_a_mla_shape_without_its_latent_is_refused():
    with pytest.raises(ValueError, match="mla needs kv_lora_rank"):
        ModelShape("x", 2, 64, 4, 4, 128, 10, 32, attention="mla")


def test_a_config_model_shape_with_moe_fields_is_the_named_shape():
    ms = dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=32000,
              max_context_tokens=32768, experts=8, experts_per_token=2, expert_intermediate=14336)
    cfg = load_config({"model": "mixtral-8x7b", "model_shape": ms})
    assert cfg.shape() == MODELS["mixtral-8x7b"]


def test_every_gpu_names_its_source_and_the_superchips_their_host_memory():
    assert all(g.source and not g.measured for g in GPUS.values())
    assert GPUS["gh200"].host_link_gbps == 450.0 and GPUS["gh200"].host_memory_bytes == 480e9
    assert GPUS["gb200"].host_link_gbps == 225.0 and GPUS["gb200"].host_memory_bytes == 240e9


@pytest.mark.parametrize("path", sorted(Path("configs/hardware").glob("*_datasheet.yaml")))
def test_datasheet_hardware_configs_load(path):
    cfg = load_config(path)
    assert cfg.gpu.name in GPUS and cfg.shape().name in MODELS
