"""The roofline's efficiencies as measured on an H100, in place of one MFU and one MBU for every shape.

A constant MFU 0.55 is 16% (7B) / 14% (70B) off measured H100 layer times, and -45% at the
memory/compute knee, where a GEMM reaches neither its compute nor its memory roof (issue 16, item 6).
`RooflineEfficiency` prices one decoder layer as the kernels it runs, each against its own measured
share of the peaks:
  * the layer's GEMMs: max(FLOPs / (peak x gemm_flops(M)), bytes / (bandwidth x gemm_bw(M))), the two
    fractions read off a GEMM sweep at M rows (tokens in the step), interpolated in log(M);
  * attention: max(FLOPs / (peak x attention_flops), KV bytes / (bandwidth x kv_bw));
  * the layer's other kernels (norms, RoPE, SiLU, residual adds): `act_passes` passes over each token's
    hidden state and MLP activations at full bandwidth, plus `layer_fixed_s` (their launch floor).

`H100` holds the figures `bench/fit_roofline_efficiency.py` derives from run 13 (4 x H100 80GB HBM3,
2026-11-27): the GEMM fractions from `results/gpu/run13_tp/call3_gemm.csv` (the qkv / o / gate_up /
down matrices of LLaMA-2 7B and 13B and of Llama-3.1-70B at TP 1, 2, 4, summed per shape, the median
over the five shapes at each M), the attention and other-kernel terms fitted to the Llama-3.1-70B TP 1
layer times in `results/gpu/run13_tp/call3_tp_layer.csv`. `bench/roofline_vs_measured.py` checks the
result against those and against the LLaMA-2 7B layer tables of `configs/hardware/h100.yaml` (another
H100, not used in the fit).

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

    def gemm_s(self, flops: float, nbytes: float, tokens: float, peak_flops: float, bw_bytes_s: float) -> float:
        """GEMMs of `flops` that read/write `nbytes`, over `tokens` rows, on `peak_flops` and `bw_bytes_s`."""
        if tokens <= 0:
            return 0.0
        ef, eb = self.gemm_fractions(tokens)
        c, m = flops / (peak_flops * ef), nbytes / (bw_bytes_s * eb)
        return c if c > m else m

    def act_bytes_per_token(self, shape: ModelShape, gpus: int) -> float:
        """Bytes one GPU's non-GEMM kernels move per token per layer: `act_passes` x (the hidden state,
        replicated on every GPU, plus the GPU's share of the MLP's active width), in bf16."""
        return self.act_passes * ACTIVATION_BYTES * (shape.hidden + mlp_active_width(shape) / gpus)


def mlp_active_width(shape: ModelShape) -> float:
    """Width of a token's MLP activations per layer (mean over layers): the dense MLP's intermediate, or
    a MoE layer's chosen and shared experts."""
    if not shape.experts:
        return float(shape.intermediate)
    moe = (shape.experts_per_token + shape.shared_experts) * shape.expert_intermediate
    return (shape.dense_layers * shape.intermediate + shape.moe_layers * moe) / shape.layers


# Written by `python bench/fit_roofline_efficiency.py` (see the module docstring); do not edit by hand.
H100 = RooflineEfficiency(
    tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
    gemm_flops=(0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.748, 0.696, 0.719, 0.744, 0.754, 0.764, 0.743, 0.737, 0.748),
    gemm_bw=(0.775, 0.773, 0.766, 0.77, 0.773, 0.763, 0.764, 0.743, 0.713, 0.77, 0.77, 0.77, 0.77, 0.77, 0.77, 0.77, 0.77),
    attention_flops=0.275, kv_bw=0.975, act_passes=16.5, layer_fixed_s=4.38e-05,
    source="H100 80GB HBM3, results/gpu/run13_tp call3 (2026-11-27): GEMM sweep call3_gemm.csv; attention and other kernels fitted to call3_tp_layer.csv, Llama-3.1-70B TP 1")
