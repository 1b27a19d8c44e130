"""One shape table: the executor's decoder and the Round Attention forward take the simulator's ModelShape."""
from types import SimpleNamespace

import pytest
import torch

from gpu import model as M
from gpu.executor import Executor
from gpu.plans import PLANS
from gpu.roundattn.model import random_weights
from gpu.roundattn.smollm2 import shape_from_config
from sim.errors import KvsimError
from sim.models import MODELS, ModelShape


def test_executor_shapes_are_the_simulators_table_entries():
    assert M.SHAPES == {"llama2-7b": MODELS["llama2-7b"], "llama2-13b": MODELS["llama2-13b"],
                        "llama3.1-8b": MODELS["llama3.1-8b"]}
    # LLaMA-2 7B: K and V x 32 heads x 128 dims x 2 bytes (bf16)
    assert M.SHAPES["llama2-7b"].kv_bytes_per_token_layer == 2 * 32 * 128 * 2
    # Llama-3.1-8B: K and V x 8 KV heads x 128 dims x 2 bytes
    assert M.SHAPES["llama3.1-8b"].kv_bytes_per_token_layer == 2 * 8 * 128 * 2 == 4096


def test_a_gqa_decoders_weights_and_caches_hold_its_kv_heads():
    model = M.random_decoder(M.TINY_GQA, 16, "cpu", torch.float32, layers=1)
    # head_dim 64 / 8 = 8; q: 8 heads x 8, k and v: 2 KV heads x 8 each, over hidden 64
    assert model.layers[0].wqkv.shape == ((8 + 2 * 2) * 8, 64) == (96, 64)
    assert model.layers[0].wo.shape == (64, 64)
    # its caches: K and V x 2 KV heads x 8 dims x 4 bytes (float32)
    assert model.shape.kv_bytes_per_token_layer == 2 * 2 * 8 * 4 == 128


def test_a_tp_shard_holds_its_share_of_heads_and_kv():
    s = M.shard_shape(MODELS["llama3.1-70b"], 4)
    # 64 / 4 query heads, 8 / 4 KV heads, 28672 / 4 MLP columns; head_dim stays 128
    assert (s.heads, s.kv_heads, s.intermediate, s.head_dim, s.hidden) == (16, 2, 7168, 128, 8192)
    # a rank's cache: K and V x 2 KV heads x 128 x 2 bytes per token per layer, a quarter of the model's
    assert s.kv_bytes_per_token_layer == 1024 == MODELS["llama3.1-70b"].kv_bytes_per_token_layer // 4
    with pytest.raises(ValueError, match="kv_heads 8 does not split over tp=16"):
        M.shard_shape(MODELS["llama3.1-70b"], 16)


def test_a_decoders_shape_counts_the_bytes_its_caches_hold():
    model = M.random_decoder(M.TINY, 1024, "cpu", torch.float32, seed=0)
    # tiny: K and V x 4 heads x 16 dims x 4 bytes (float32)
    assert model.shape.kv_bytes_per_token_layer == 2 * 4 * 16 * 4 == 512
    assert model.shape.kv_bytes_per_token == 4 * 512
    ex = Executor(model, PLANS["dram_overlap"], max_ctx=32, max_new=16, host_bytes=1 << 20, decode="eager")
    one_token = ex.work[0][0, 0, 0]          # layer 0, batch 0, token 0: [2, kv_heads, head_dim]
    assert ex.token_bytes == one_token.numel() * one_token.element_size() == 512
    ex.close()


def smollm2_config(**kw):
    # SmolLM2-135M-Instruct's config.json
    c = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, head_dim=64)
    return SimpleNamespace(**{**c, **kw})


def test_smollm2_shape_read_from_its_config_is_the_tables_entry():
    shape = shape_from_config(smollm2_config())
    assert shape == MODELS["smollm2-135m"]
    # GQA: K and V x 3 KV heads x 64 dims x 2 bytes, as a server stores them
    assert shape.kv_bytes_per_token_layer == 2 * 3 * 64 * 2 == 768


def test_a_config_whose_head_dim_the_shape_cannot_derive_is_refused():
    with pytest.raises(KvsimError, match="head_dim: 128, expected hidden_size / num_attention_heads = 64"):
        shape_from_config(smollm2_config(head_dim=128))


def test_round_attention_weights_follow_the_shape_with_grouped_query_attention():
    w = random_weights(ModelShape("t", layers=2, hidden=48, heads=6, kv_heads=2, intermediate=32, vocab=11,
                                  max_context_tokens=64), seed=0)
    # head_dim 48 / 6 = 8: q projects to 6 x 8, k to 2 KV heads x 8
    assert w.layers[0].wq.shape == (48, 48) and w.layers[0].wk.shape == (2 * 8, 48)
    assert len(w.layers) == 2 and w.embed.shape == (11, 48)
