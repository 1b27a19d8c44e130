"""The roofline's efficiencies as measured on an H100, in place of one MFU and one MBU for every shape.

A constant MFU 0.55 is 16% (7B) / 14% (70B) off measured H100 layer times, and -45% at the
memory/compute knee, where a GEMM reaches neither its compute nor its memory roof (issue 16, item 6).
`RooflineEfficiency` prices one decoder layer as the kernels it runs, each against its own measured
share of the peaks:
  * the layer's GEMMs: max(FLOPs / (peak x gemm_flops(M)), bytes / (bandwidth x gemm_bw(M)) + kernels x
    gemm_fixed_s), the two fractions read off a GEMM sweep at M rows (tokens in the step), interpolated in
    log(M); bytes are the weights plus the GEMMs' own activations in and out (M x (N + K) a matrix, 8% of a
    LLaMA-2-7B layer's at M = 256). `gemm_fixed_s` is what every GEMM kernel pays on top of its bytes
    (launch ramp, a last partial wave): over the sweep's 20 matrices at M <= 64 the time is ~4 us plus the
    bytes at one bandwidth, so a model of small matrices reaches a smaller share of the bandwidth (7B's
    four GEMMs at M = 256: 0.67 of it against the five shapes' median 0.71, the 13B's 0.71, 70B's 0.76);
  * attention: max(FLOPs / (peak x attention_flops), KV bytes / (bandwidth x kv_bw)), the FLOPs those of
    the query rows the kernel really computes: FlashAttention-2's forward (torch's flash kernel, what run
    13's layers and the batched executor run, causal and bottom-right aligned) works in tiles of
    `query_tile` = 64 query rows per head and splits the keys over thread blocks until the GPU is full,
    so a prefill of n > 1 new tokens pays ceil(n / 64) x 64 rows (16 new tokens after 8,192 cost 4x their
    pairs: run 13's TP 4 layer at 16 tokens was 14% slower than its real pairs priced);
  * attention of the prefill-first executor's padded graphs (`gpu/prefill_graph.py`) over a history:
    `masked_attention_s`. Their dense boolean mask sends torch's SDPA to the memory-efficient kernel, which
    computes the whole n x (history + n) rectangle and never splits the keys: one thread block per 64
    query rows per KV head (query heads of a group folded into rows), each walking every key. With fewer
    blocks than SMs the GPU is mostly idle and the time is a block's walk, whatever the KV bytes: the
    LLaMA-2-7B (32 heads), 13B (40) and Llama-3.1-8B (8 KV heads, a quarter of the KV bytes) tables all
    add ~23 ns a history token at 16..512 new tokens, and twice that once the blocks pass 2 x 132.
    The executor's decode graphs (`gpu/decode_graph.py`) pass a dense padding mask too: with GQA
    (Llama-3.1-8B) a KV head's 4 query heads fold into 4 rows, batch x 8 blocks walk every key, and the
    table adds ~20 ns a context token at batch 1..16 (the same block walk, new = 1 per sequence); with MHA
    (LLaMA-2) each block holds one query row and the 7B / 13B tables read the KV at full bandwidth, as
    flash (the kernel spreads a one-row query over the keys: same backend, same mask, only the rows
    differ). Which backend this is: torch 2.11's dispatch tries cuDNN first on an H100 once its bundled
    cuDNN is newer than 9.15 (`check_prefer_cudnn_attention` in sdp_utils.cpp), and cuDNN's gates accept
    these calls; else the memory-efficient kernel. Flash refuses any dense mask. No run has recorded the
    backend: the model needs only the blocks and rows above;
  * the layer's other kernels (norms, RoPE, SiLU, residual adds): `act_passes` passes over each token's
    hidden state and MLP activations at full bandwidth, plus `layer_fixed_s` (their launch floor).

`H100` holds the figures `python bench/roofline_vs_measured.py --fit --write` derives from run 13 (4 x
H100 80GB HBM3, 2026-11-27): the GEMM fractions from `results/gpu/run13_tp/call3_gemm.csv` (the qkv / o /
gate_up / down matrices of LLaMA-2 7B and 13B and of Llama-3.1-70B at TP 1, 2, 4, summed per shape, the
median over the five shapes at each M) and the fixed time of a GEMM kernel (the same sweep's intercept of
time against bytes at M <= 64: 4.2 us), the flash attention and other-kernel terms fitted to the
Llama-3.1-70B TP 1 layer times in `results/gpu/run13_tp/call3_tp_layer.csv`; the masked kernel's three
terms fitted to the LLaMA-2-7B prefill-after-history table of `configs/hardware/h100.yaml` (the only
kernel of its kind in the tool's data: run 13 ran flash). The LLaMA-2-13B table (same call) and
Llama-3.1-8B's (run 14, grouped-query attention) are out of sample for all of it, as are the TP shards.

Datasheet-only GPUs (H200, B200, GB200, GH200) use the same fractions of their own peaks: their
bf16 ridge points (peak / bandwidth: 206 to 312 FLOP/byte) sit near H100's 295, so the knee falls at
a similar M. That is an assumption until they are measured.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from sim.models import ACTIVATION_BYTES, ModelShape


@dataclass(frozen=True)
class RooflineEfficiency:
    tokens: tuple           # GEMM rows M (tokens in the step), ascending
    gemm_flops: tuple       # share of peak FLOP/s the layer's GEMMs reach at M (their compute side)
    gemm_bw: tuple          # share of HBM bandwidth they reach at M (their memory side)
    attention_flops: float  # share of peak FLOP/s of attention's QK^T and PV
    kv_bw: float            # share of HBM bandwidth of attention's KV reads and writes
    act_passes: float       # passes of the other kernels over a token's activations, at full bandwidth
    layer_fixed_s: float    # per layer: the other kernels' floor (launches of small kernels)
    masked_flops: float = 0.3   # masked kernel: share of peak FLOP/s with `blocks_per_sm` blocks on every SM
    masked_lone: float = 1.0    # masked kernel: a wave of at most one block per SM, as a share of a full wave's time
    masked_fixed_s: float = 0.0  # masked kernel, per layer: the mask made a bias, the kernel's start
    gemm_fixed_s: float = 0.0   # per GEMM kernel, on its memory side: launch ramp and last wave
    query_tile: int = 64        # query rows per thread block (FA2's split-KV forward, the memory-efficient kernel)
    blocks_per_sm: int = 2      # thread blocks of the attention kernels one SM holds at once
    source: str = ""

    def __post_init__(self):
        n = len(self.tokens)
        if n < 2 or len(self.gemm_flops) != n or len(self.gemm_bw) != n:
            raise ValueError("RooflineEfficiency: tokens, gemm_flops and gemm_bw need the same length >= 2")
        # interpolation in log(M), folded once
        object.__setattr__(self, "_logm", tuple(math.log(m) for m in self.tokens))

    def gemm_fractions(self, tokens: float) -> tuple[float, float]:
        """(FLOP/s share, bandwidth share) of GEMMs over `tokens` rows; clamped to the measured range
        (1 to 4,096 rows: past it the sweep's fractions are flat)."""
        xs = self._logm
        x = math.log(tokens) if tokens > 1.0 else 0.0
        if x <= xs[0]:
            return self.gemm_flops[0], self.gemm_bw[0]
        if x >= xs[-1]:
            return self.gemm_flops[-1], self.gemm_bw[-1]
        i = bisect.bisect_right(xs, x) - 1
        f = (x - xs[i]) / (xs[i + 1] - xs[i])
        a, b = self.gemm_flops, self.gemm_bw
        return a[i] + (a[i + 1] - a[i]) * f, b[i] + (b[i + 1] - b[i]) * f

    def gemm_s(self, flops: float, nbytes: float, tokens: float, peak_flops: float, bw_bytes_s: float,
               kernels: int = 0) -> float:
        """`kernels` GEMMs of `flops` in all that read/write `nbytes`, over `tokens` rows, on `peak_flops`
        and `bw_bytes_s`. The compute share was measured on whole kernel times, so the fixed time is on
        the memory side only."""
        if tokens <= 0:
            return 0.0
        ef, eb = self.gemm_fractions(tokens)
        c, m = flops / (peak_flops * ef), nbytes / (bw_bytes_s * eb) + kernels * self.gemm_fixed_s
        return c if c > m else m

    def padded_rows(self, new: float) -> float:
        """Query rows the flash kernel computes for `new` tokens of one sequence: whole tiles of
        `query_tile`. One token is left as it is: for a single query FA2 folds a KV head's query group
        into the rows (`seqlenq_ngroups_swapped`), and one token's attention is KV-bound anyway."""
        if new <= 1:
            return new
        t = self.query_tile
        return -(-new // t) * t

    def masked_attention_s(self, head_dim: int, q_heads: float, kv_heads: float, new: float, hist: float,
                           peak_flops: float, sms: int, seqs: int = 1) -> float:
        """Compute time of the memory-efficient kernel over a dense mask on one GPU holding `q_heads` query
        and `kv_heads` KV heads: each of `seqs` sequences' `new` queries against all its `hist + new` keys
        (the full rectangle: the mask hides the causal half, the kernel still computes it), without
        splitting the keys.

        Thread blocks: seqs x kv_heads x ceil(g x new / query_tile), g = q_heads / kv_heads query heads
        per KV head folded into the rows (`gpu.model.attend`). A wave of slots = `blocks_per_sm` x `sms`
        blocks walks each key in slots x query_tile x 4 x head_dim / (peak x masked_flops); the blocks take
        ceil(blocks / slots) waves, and a wave that leaves each SM at most one block lasts `masked_lone`
        of that (a block alone on its SM runs faster than two sharing it). The executor's GQA decode
        graphs are this kernel with new = 1 and g rows a block (see `RooflineCost`).
        """
        g = q_heads / kv_heads
        blocks = seqs * kv_heads * math.ceil(g * new / self.query_tile)
        slots = self.blocks_per_sm * sms
        wave_key_s = slots * self.query_tile * 4.0 * head_dim / (peak_flops * self.masked_flops)
        waves = self.masked_lone if blocks <= sms else math.ceil(blocks / slots)
        return waves * (hist + new) * wave_key_s

    def act_bytes_per_token(self, shape: ModelShape, gpus: int) -> float:
        """Bytes one GPU's non-GEMM kernels move per token per layer: `act_passes` x (the hidden state,
        replicated on every GPU, plus the GPU's share of the MLP's active width), in bf16."""
        return self.act_passes * ACTIVATION_BYTES * (shape.hidden + mlp_active_width(shape) / gpus)


# GEMM kernels of a dense decoder layer: the fused qkv projection, o, the fused gate/up projection, down
# (`gpu.model`, run 13's layer). A MoE layer's routed experts add two grouped GEMMs (an assumption: no
# MoE layer has been measured).
GEMMS_PER_LAYER = 4
ROUTED_GEMMS = 2


def gemm_act_bytes_per_token(shape: ModelShape, gpus: int) -> float:
    """Bytes one token's activations add to one GPU's GEMMs per layer, in and out of each matrix
    (M x (N + K) elements a matrix): the hidden state into qkv and gate/up and out of o and down
    (replicated on every GPU), and the GPU's shares of q, k, v, the attention output and the MLP's active
    width. LLaMA-2-7B: 4 x 4,096 + 2 x 4,096 + 2 x 4,096 + 3 x 11,008 = 65,792 elements. An MLA layer's
    latent projections are counted as its q, k, v (an approximation: none measured)."""
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    return ACTIVATION_BYTES * (4 * shape.hidden + (2 * q + 2 * kv + 3 * mlp_active_width(shape)) / gpus)


def mlp_active_width(shape: ModelShape) -> float:
    """Width of a token's MLP activations per layer (mean over layers): the dense MLP's intermediate, or
    a MoE layer's chosen and shared experts."""
    if not shape.experts:
        return float(shape.intermediate)
    moe = (shape.experts_per_token + shape.shared_experts) * shape.expert_intermediate
    return (shape.dense_layers * shape.intermediate + shape.moe_layers * moe) / shape.layers


# Written by `python bench/roofline_vs_measured.py --fit --write` (see the module docstring); do not edit by hand.
H100 = RooflineEfficiency(
    tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
    gemm_flops=(0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.696, 0.719, 0.744, 0.754, 0.764, 0.743, 0.737, 0.748),
    gemm_bw=(0.831, 0.829, 0.828, 0.826, 0.83, 0.818, 0.818, 0.801, 0.763, 0.828, 0.828, 0.828, 0.828, 0.828, 0.828, 0.828, 0.828),
    attention_flops=0.27, kv_bw=0.945, act_passes=16.75, layer_fixed_s=4.38e-05,
    masked_flops=0.285, masked_lone=0.73, masked_fixed_s=1.8e-05, gemm_fixed_s=4.2e-06,
    source="H100 80GB HBM3, results/gpu/run13_tp call3 (2026-11-27): GEMM sweep call3_gemm.csv; flash attention and other kernels fitted to call3_tp_layer.csv, Llama-3.1-70B TP 1; masked attention to configs/hardware/h100.yaml, LLaMA-2-7B prefill after history")
