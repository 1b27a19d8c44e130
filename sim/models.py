"""Named model and GPU shapes: one table each, so configs say `model: llama2-13b` instead of numbers.

`ModelShape` is the one description of a model's shape for the simulator and for `gpu/` alike: the
executor's random-weight decoder (`gpu/model.py`) and the Round Attention forward over SmolLM2
(`gpu/roundattn/model.py`) are built from one, so the KV bytes a token costs are computed in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Read buffer of the layer-wise preload, in layers (CachedAttention §3.2: loads run this many layers
# ahead of the compute). One default for the simulator's `policy.read_buffer_layers` and the GPU
# executor's `ServePlan`: every committed GPU run that overlapped its loads used 2.
READ_BUFFER_LAYERS = 2


# Activations (and so the tensor-parallel all-reduces) are bf16 whatever the weights' format, as
# vLLM and SGLang run fp8 and MXFP4 checkpoints.
ACTIVATION_BYTES = 2
ATTENTION_KINDS = ("mha", "gqa", "mla")


@dataclass(frozen=True)
class ModelShape:
    """A decoder's shape, as its published config states it.

    Optional fields default so that a LLaMA-2-era shape (MHA/GQA, dense MLP, every layer attending the
    whole context, KV in the weights' dtype) is described by the first nine fields alone, its numbers
    unchanged. Names follow the HF config keys they come from (in brackets below).
    """
    name: str
    layers: int                 # [num_hidden_layers]
    hidden: int                 # [hidden_size]
    heads: int                  # [num_attention_heads]
    kv_heads: int               # [num_key_value_heads]
    intermediate: int           # [intermediate_size]: the dense MLP's width
    vocab: int                  # [vocab_size]
    max_context_tokens: int     # [max_position_embeddings]
    dtype_bytes: int = 2        # bytes per weight (bf16: 2; DeepSeek-V3's published fp8 checkpoint: 1)
    mlp_matrices: int = 3       # gated MLP (LLaMA) has 3 matrices, Falcon's plain MLP has 2
    head_dim: Optional[int] = None          # [head_dim]; unset: hidden // heads (LLaMA-2 and older state none)
    attention: Optional[str] = None         # mha | gqa | mla; unset: mha when kv_heads == heads, else gqa
    # Multi-head latent attention (DeepSeek-V2/V3): one latent of kv_lora_rank + qk_rope_head_dim per
    # token per layer is all the cache holds
    kv_lora_rank: int = 0                   # [kv_lora_rank]
    qk_rope_head_dim: int = 0               # [qk_rope_head_dim]
    qk_nope_head_dim: int = 0               # [qk_nope_head_dim]
    v_head_dim: int = 0                     # [v_head_dim]
    q_lora_rank: int = 0                    # [q_lora_rank]; 0: queries projected directly
    # Sliding-window layers hold and attend at most `sliding_window` tokens. Every
    # `full_attention_interval`-th layer (1-based) attends the whole context; 0: every layer slides
    sliding_window: int = 0                 # [sliding_window]; 0: none
    full_attention_interval: int = 0        # from [layer_types]: gpt-oss alternates, so 2
    # Mixture of experts: `experts` routed experts of width `expert_intermediate`, `experts_per_token`
    # chosen per token, `shared_experts` always on; the first `dense_layers` layers keep a dense MLP
    experts: int = 0                        # [num_local_experts | num_experts | n_routed_experts]
    experts_per_token: int = 0              # [num_experts_per_tok]
    shared_experts: int = 0                 # [n_shared_experts]
    expert_intermediate: int = 0            # [moe_intermediate_size]; Mixtral and gpt-oss: intermediate_size
    dense_layers: int = 0                   # [first_k_dense_replace]
    kv_dtype_bytes: Optional[int] = None    # KV cache element size; unset: dtype_bytes (fp8 KV: 1)
    expert_dtype_bytes: Optional[float] = None  # routed experts' bytes per weight; unset: dtype_bytes

    def __post_init__(self):
        # resolve the unset fields once, so every reader sees plain numbers (and equal shapes compare equal)
        if self.head_dim is None:
            hd = self.qk_nope_head_dim + self.qk_rope_head_dim if self.kv_lora_rank else self.hidden // self.heads
            object.__setattr__(self, "head_dim", hd)
        if self.attention is None:
            kind = "mla" if self.kv_lora_rank else ("mha" if self.kv_heads == self.heads else "gqa")
            object.__setattr__(self, "attention", kind)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{self.name}: attention {self.attention!r}, expected one of {ATTENTION_KINDS}")
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_rope_head_dim):
            raise ValueError(f"{self.name}: mla needs kv_lora_rank and qk_rope_head_dim")

    # the element sizes stay unset in the fields, so a copy with another dtype_bytes (gpu/model.py runs
    # float32 shapes) follows it
    @property
    def kv_element_bytes(self) -> float:
        return self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes

    @property
    def expert_element_bytes(self) -> float:
        return self.dtype_bytes if self.expert_dtype_bytes is None else self.expert_dtype_bytes

    # --- KV cache: the one place its size is computed, by attention kind
    @property
    def kv_bytes_per_token_layer(self) -> int:
        """One token's cache in one layer. MHA/GQA: K and V of each KV head, 2 x kv_heads x head_dim;
        MLA: one compressed latent plus the decoupled RoPE key, kv_lora_rank + qk_rope_head_dim
        (DeepSeek-V2 §2.1.2), shared by all heads. Times the KV element size."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_element_bytes
        return 2 * self.kv_heads * self.head_dim * self.kv_element_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """One token's cache over all layers while the context fits every window (see `kv_bytes`)."""
        return self.layers * self.kv_bytes_per_token_layer

    @property
    def sliding_layers(self) -> int:
        """Layers that attend (and keep) only the last `sliding_window` tokens."""
        if not self.sliding_window:
            return 0
        if not self.full_attention_interval:
            return self.layers
        return self.layers - self.layers // self.full_attention_interval

    def kv_bytes_fn(self):
        """`kv_bytes` as a plain function of the tokens, its constants folded (the simulator calls it
        per turn; the properties behind it cost a call each)."""
        if self.sliding_layers:
            return self.kv_bytes
        per = self.kv_bytes_per_token
        return lambda tokens: per * tokens

    def kv_bytes(self, tokens: float) -> float:
        """Cache of a `tokens`-token context over all layers: a sliding-window layer holds at most its
        window (as vLLM's hybrid KV manager frees blocks that left it), a full layer every token."""
        slide = self.sliding_layers
        if not slide:
            return self.kv_bytes_per_token * tokens
        per = self.kv_bytes_per_token_layer
        return per * ((self.layers - slide) * tokens + slide * min(tokens, self.sliding_window))

    # --- weights and parameters
    @property
    def attn_params_per_layer(self) -> int:
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (self.hidden * self.q_lora_rank + self.q_lora_rank * self.heads * qk if self.q_lora_rank
                 else self.hidden * self.heads * qk)
            kv_down = self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + self.heads * self.v_head_dim * self.hidden
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """One expert's MLP (routed and shared experts have the same width)."""
        return self.mlp_matrices * self.hidden * self.expert_intermediate

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def params_per_layer(self) -> float:
        """All weights of the decoder layers, per layer (the mean, where dense and MoE layers mix)."""
        if not self.experts:
            return self.attn_params_per_layer + self.dense_mlp_params
        return self.layer_params / self.layers

    @property
    def layer_params(self) -> int:
        """All weights of all decoder layers (every expert, the routers; norms and biases left out)."""
        L = self.layers
        if not self.experts:
            return L * (self.attn_params_per_layer + self.dense_mlp_params)
        moe = (self.experts + self.shared_experts) * self.expert_params + self.hidden * self.experts
        return L * self.attn_params_per_layer + self.dense_layers * self.dense_mlp_params + self.moe_layers * moe

    @property
    def active_layer_params(self) -> int:
        """Decoder-layer weights one token multiplies by: attention, the dense MLPs, and in each MoE layer
        its router, its shared experts and the `experts_per_token` routed ones."""
        if not self.experts:
            return self.layer_params
        moe = (self.experts_per_token + self.shared_experts) * self.expert_params + self.hidden * self.experts
        return self.layers * self.attn_params_per_layer + self.dense_layers * self.dense_mlp_params + self.moe_layers * moe

    @property
    def embed_and_head_params(self) -> int:
        return 2 * self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.layer_params + self.embed_and_head_params

    @property
    def active_params(self) -> int:
        return self.active_layer_params + self.embed_and_head_params

    @property
    def routed_expert_params(self) -> int:
        """Routed experts over all MoE layers: the weights stored at `expert_dtype_bytes`."""
        return self.moe_layers * self.experts * self.expert_params

    @property
    def weight_bytes(self) -> float:
        """HBM the weights take: every weight, the experts no token touches included."""
        if not self.experts:
            return (self.layers * self.params_per_layer + self.embed_and_head_params) * self.dtype_bytes
        routed = self.routed_expert_params
        return (self.total_params - routed) * self.dtype_bytes + routed * self.expert_element_bytes

    @property
    def routed_expert_bytes(self) -> float:
        """HBM the routed experts take (all MoE layers): what expert parallelism spreads over the GPUs."""
        return self.routed_expert_params * self.expert_element_bytes

    def expert_parallel_weight_bytes(self, gpus: int) -> float:
        """Weights one GPU holds under expert parallelism with data-parallel attention (SGLang / vLLM
        "DP attention + EP"): a full copy of every non-expert weight (attention, dense MLPs, shared
        experts, routers, embeddings, LM head) and its 1/gpus of the routed experts."""
        return (self.total_params - self.routed_expert_params) * self.dtype_bytes + self.routed_expert_bytes / gpus

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct routed experts that `tokens` tokens choose in one MoE layer, each picking
        experts_per_token of the `experts` uniformly: E (1 - (1 - k/E)^B). Uniform routing is the
        upper bound; a skewed router touches fewer."""
        if not self.experts or tokens <= 0:
            return 0.0
        return expected_distinct(self.experts, self.experts_per_token, tokens)

    def experts_touched_on_gpu(self, pairs: float, gpus: int) -> float:
        """Expert parallelism: expected distinct experts among one GPU's experts / gpus that `pairs`
        (token, expert) pairs routed to that GPU touch, each pair on one of them uniformly."""
        if not self.experts or pairs <= 0:
            return 0.0
        return expected_distinct(self.experts / gpus, 1, pairs)


def expected_distinct(bins: float, picks: float, draws: float) -> float:
    """Expected distinct bins hit by `draws` draws, each picking `picks` distinct bins of `bins`
    uniformly: bins (1 - (1 - picks/bins)^draws)."""
    return bins * (1.0 - (1.0 - picks / bins) ** draws)


# Shapes from the models' published configs. Each entry names where its numbers were read:
#   [hf] the release's HF config.json; [aic] that config.json as vendored in ai-dynamo/aiconfigurator at
#   095f58a5, aic-core/src/aiconfigurator_core/model_configs/<org>--<model>_config.json; [meta] the
#   shape in meta-llama/llama-models models/llama3_1/api/sku_list.py. Weights are bf16 unless the
#   published checkpoint says otherwise; KV is in the weights' dtype (bf16) unless a config sets it.
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
        # [aic] meta-llama--Meta-Llama-3.1-{8B,70B,405B}; [meta] the same dim/layers/heads (intermediate
        # from its ffn_dim_multiplier and multiple_of)
        ModelShape("llama3.1-8b", 32, 4096, 32, 8, 14336, 128256, 131072),
        ModelShape("llama3.1-70b", 80, 8192, 64, 8, 28672, 128256, 131072),
        ModelShape("llama3.1-405b", 126, 16384, 128, 8, 53248, 128256, 131072),
        # [aic] src/aiconfigurator/model_configs/meta-llama--Llama-3.3-70B-Instruct_config.json (f577ab84)
        ModelShape("llama3.3-70b", 80, 8192, 64, 8, 28672, 128256, 131072),
        # Qwen2.5 (no head_dim key: hidden/heads = 128). 32B: [hf] huggingface.co/Qwen/Qwen2.5-32B. 7B and
        # 72B: the Qwen org's own config.json was not reachable here; read from fine-tunes' config.json that
        # keep the base's architecture and name it (_name_or_path): huggingface.co/fblgit/cybertron-v4-qw7B-MGS
        # (Qwen/Qwen2.5-7B) and huggingface.co/BitStack/BitStack-Qwen2.5-72B (Qwen2.5-72B)
        ModelShape("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, 131072),
        ModelShape("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064, 131072),
        ModelShape("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, 131072),
        # [aic] Qwen--Qwen3-8B, Qwen--Qwen3-32B: head_dim 128 is stated (Qwen3-32B: 64 x 128 != hidden 5120)
        ModelShape("qwen3-8b", 36, 4096, 32, 8, 12288, 151936, 40960, head_dim=128),
        ModelShape("qwen3-32b", 64, 5120, 64, 8, 25600, 151936, 40960, head_dim=128),
        # [aic] Qwen--Qwen3-30B-A3B, Qwen--Qwen3-235B-A22B: every layer MoE (decoder_sparse_step 1, no
        # mlp_only_layers), no shared expert; intermediate_size is unused by their layers
        ModelShape("qwen3-30b-a3b", 48, 2048, 32, 4, 6144, 151936, 40960, head_dim=128,
                   experts=128, experts_per_token=8, expert_intermediate=768),
        ModelShape("qwen3-235b-a22b", 94, 4096, 64, 4, 12288, 151936, 40960, head_dim=128,
                   experts=128, experts_per_token=8, expert_intermediate=1536),
        # [aic] mistralai--Mixtral-8x7B-v0.1, mistralai--Mixtral-8x22B-v0.1 (sliding_window null): each
        # expert is a full-width MLP (intermediate_size)
        ModelShape("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768,
                   experts=8, experts_per_token=2, expert_intermediate=14336),
        ModelShape("mixtral-8x22b", 56, 6144, 48, 8, 16384, 32000, 65536,
                   experts=8, experts_per_token=2, expert_intermediate=16384),
        # [aic] deepseek-ai--DeepSeek-V3 and deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json:
        # MLA, 256 routed + 1 shared expert (top-8), first 3 layers dense; the published checkpoint is
        # fp8 (quantization_config fp8), its KV cache bf16
        ModelShape("deepseek-v3", 61, 7168, 128, 128, 18432, 129280, 163840, dtype_bytes=1, kv_dtype_bytes=2,
                   kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                   q_lora_rank=1536, experts=256, experts_per_token=8, shared_experts=1,
                   expert_intermediate=2048, dense_layers=3),
        # [aic] openai--gpt-oss-120b: layer_types alternate sliding_attention (even layers) and
        # full_attention, sliding_window 128 (openai/gpt-oss gpt_oss/torch/model.py: "sliding window to
        # every other layer"); its MoE weights ship as MXFP4 (openai/gpt-oss README): 4-bit elements plus
        # one 8-bit scale per 32 (OCP MX v1.0), 4.25 bits = 0.53125 bytes a weight; the rest bf16
        ModelShape("gpt-oss-120b", 36, 2880, 64, 8, 2880, 201088, 131072, head_dim=64, sliding_window=128,
                   full_attention_interval=2, experts=128, experts_per_token=4, expert_intermediate=2880,
                   expert_dtype_bytes=0.53125),
    )
}


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's datasheet figures (a measured profile, gpu/calibrate, replaces them)."""
    name: str
    hbm_bytes: float
    peak_flops: float  # dense bf16
    hbm_bw_gbps: float
    nvlink_gbps: float = 0.0      # GPU-to-GPU, per direction (tensor-parallel all-reduces); 0: none
    host_link_gbps: float = 0.0   # to host memory, per direction, per GPU: the value to give host.h2d_gbps
    host_memory_bytes: float = 0.0  # CPU memory a superchip puts behind that link, per GPU (host.dram_bytes)
    source: str = ""              # where the figures come from
    measured: bool = False        # False: datasheet figures
    sms: int = 0                  # streaming multiprocessors: how many thread blocks of a kernel run at once


# Host links and NVMe drives as named figures: a config sets them as host.h2d_gbps / host.d2h_gbps and
# ssd.read_gbps / ssd.write_gbps (configs/hardware/*_datasheet.yaml do). Per direction, GB/s.
# PCIe: 16 lanes x 16 GT/s (Gen4) or 32 GT/s (Gen5) with 128b/130b coding (PCIe 4.0 / 5.0 base specs);
# pinned copies reach less (the H100 profile, configs/hardware/h100.yaml, measured 54.8 GB/s on Gen5).
# NVLink-C2C: 900 GB/s bidirectional between Grace and Hopper (GH200 datasheet).
HOST_LINKS_GBPS = {
    "pcie4-x16": 16 * 16 / 8 * 128 / 130,   # 31.5
    "pcie5-x16": 16 * 32 / 8 * 128 / 130,   # 63.0
    "nvlink-c2c": 450.0,
}
# Datacenter NVMe, sequential (read, write) GB/s per drive, vendor figures: PCIe Gen4 Samsung PM9A3
# (U.2/E1.S, 6.5 / 3.5), PCIe Gen5 Samsung PM1743 (13.0 / 6.6), as announced by Samsung.
NVME_GBPS = {
    "gen4": (6.5, 3.5),
    "gen5": (13.0, 6.6),
}

# Datasheet figures (dense bf16, SXM parts). A measured profile (gpu/calibrate) replaces them. NVLink is
# per direction: A100 NVLink 3 600 GB/s, H100/H200 NVLink 4 900 GB/s, Blackwell NVLink 5 1.8 TB/s total.
# SMs: A100 108 and H100 SXM5 132 (NVIDIA's Ampere / Hopper architecture whitepapers; H200 and GH200 carry
# the H100 die), B200 148 (its CUDA device query, pytorch/ao#4002; GB200's GPUs taken as the same part).
GPUS = {
    g.name: g
    for g in (
        GpuSpec("a100-80gb", 80 * 2**30, 312e12, 2039.0, 300.0, HOST_LINKS_GBPS["pcie4-x16"], sms=108,
                source="NVIDIA A100 datasheet (SXM4 80GB)"),
        GpuSpec("h100-80gb", 80 * 2**30, 989e12, 3350.0, 450.0, HOST_LINKS_GBPS["pcie5-x16"], sms=132,
                source="NVIDIA H100 datasheet (SXM5): 989.4 TF bf16 dense, 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5"),
        GpuSpec("h200", 141e9, 989e12, 4800.0, 450.0, HOST_LINKS_GBPS["pcie5-x16"], sms=132,
                source="NVIDIA H200 SXM: 141 GB HBM3e at 4.8 TB/s, H100's compute and NVLink 4 (SC23 announcement)"),
        # HGX B200: 8 x 180 GB HBM3e at 8 TB/s, 2.25 PF bf16 dense per GPU at 1000 W (glennklockwood.com/
        # garden/processors/B200 from NVIDIA's Blackwell datasheet), NVLink 5
        GpuSpec("b200", 180e9, 2.25e15, 8000.0, 900.0, HOST_LINKS_GBPS["pcie5-x16"], sms=148,
                source="NVIDIA HGX B200 datasheet: 180 GB HBM3e, 8 TB/s, 2.25 PF bf16 dense, NVLink 5 1.8 TB/s"),
        # GB200 NVL72: 13.4 TB HBM3e and 576 TB/s over 72 GPUs, 2.5 PF bf16 dense per GPU (1200 W); each
        # Grace (480 GB LPDDR5X) serves two GPUs over a 900 GB/s bidirectional NVLink-C2C, so per GPU
        # half of each: 240 GB and 225 GB/s per direction
        GpuSpec("gb200", 13.4e12 / 72, 2.5e15, 576e3 / 72, 900.0, 900.0 / 2 / 2, 480e9 / 2, sms=148,
                source="NVIDIA GB200 NVL72 datasheet: 13.4 TB HBM3e, 576 TB/s, 180 PF bf16 dense per 72 GPUs; "
                       "Grace 480 GB LPDDR5X, NVLink-C2C 900 GB/s per superchip (2 GPUs)"),
        # GH200 (HBM3 version): the H100 GPU with 96 GB at 4 TB/s and its own Grace (480 GB LPDDR5X)
        # behind a 900 GB/s bidirectional NVLink-C2C: host memory as a fast tier
        GpuSpec("gh200", 96e9, 989e12, 4000.0, 450.0, HOST_LINKS_GBPS["nvlink-c2c"], 480e9, sms=132,
                source="NVIDIA GH200 Grace Hopper datasheet: 96 GB HBM3 4 TB/s, 480 GB LPDDR5X, "
                       "NVLink-C2C 900 GB/s"),
    )
}
