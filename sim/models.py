"""Named model and GPU shapes: one table each, so configs say `model: llama2-13b` instead of numbers.

`ModelShape` is the one description of a model's shape for the simulator and for `gpu/` alike: the
executor's random-weight decoder (`gpu/model.py`) and the Round Attention forward over SmolLM2
(`gpu/roundattn/model.py`) are built from one, so the KV bytes a token costs are computed in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

# Read buffer of the layer-wise preload, in layers (CachedAttention §3.2: loads run this many layers
# ahead of the compute). One default for the simulator's `policy.read_buffer_layers` and the GPU
# executor's `ServePlan`: every committed GPU run that overlapped its loads used 2.
READ_BUFFER_LAYERS = 2


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_context_tokens: int
    dtype_bytes: int = 2
    mlp_matrices: int = 3  # gated MLP (LLaMA) has 3 matrices, Falcon's plain MLP has 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer: 2 * kv_heads * head_dim * dtype_bytes."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_layer

    @property
    def params_per_layer(self) -> int:
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        attn = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        return attn + self.mlp_matrices * self.hidden * self.intermediate

    @property
    def weight_bytes(self) -> int:
        embed_and_head = 2 * self.vocab * self.hidden
        return (self.layers * self.params_per_layer + embed_and_head) * self.dtype_bytes


# Shapes from the models' published configs (HF config.json of each release).
MODELS = {
    m.name: m
    for m in (
        ModelShape("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
        ModelShape("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
        ModelShape("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096),
        ModelShape("llama-65b", 80, 8192, 64, 64, 22016, 32000, 2048),
        ModelShape("falcon-40b", 60, 8192, 128, 8, 32768, 65024, 2048, mlp_matrices=2),
        # the real model used by the Round Attention measurement (gpu/roundattn)
        ModelShape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192),
    )
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: float
    peak_flops: float  # dense bf16
    hbm_bw_gbps: float


# Datasheet figures (dense bf16, SXM parts). A measured profile (gpu/calibrate) replaces them.
GPUS = {
    g.name: g
    for g in (
        GpuSpec("a100-80gb", 80 * 2**30, 312e12, 2039.0),
        GpuSpec("h100-80gb", 80 * 2**30, 989e12, 3350.0),
        GpuSpec("h200", 141e9, 989e12, 4800.0),
    )
}
