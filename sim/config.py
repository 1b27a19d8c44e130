"""Run configuration: YAML -> frozen dataclasses, validated once at the edge.

Every field carries its own help, unit, bounds and choices (`knob`'s metadata): the loader checks
them, `kvsim config keys` lists them, and there is no second table. Every error names where the
value came from (the file, or `--set KEY`), the dotted key and what was expected, so `kvsim` can
print it on one line. The rest of the code trusts these objects. Units are in the field names.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from sim.errors import KvsimError, parse_yaml, read_yaml, show
from sim.models import GPUS, MODELS, READ_BUFFER_LAYERS, GpuSpec, ModelShape
from sim.costmodel import CONTENTION
from sim.scheduler import (PREEMPTION_MODES, SCHEDULER_KINDS, VLLM_BLOCK_TOKENS, VLLM_GPU_MAX_NUM_BATCHED_TOKENS,
                           VLLM_GPU_MAX_NUM_SEQS, VLLM_SWAP_SPACE_BYTES)

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}
_SIZE_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def _size(value, loc: str) -> float:
    if isinstance(value, bool):
        raise KvsimError(f"{loc}: expected a byte size like 128GB, got {show(value)}")
    try:
        if isinstance(value, (int, float)):
            num = float(value)
        elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m.group(2).upper() in _SIZE_UNITS:
            num = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
        else:
            raise KvsimError(f"{loc}: expected a byte size like 128GB or 2TiB, got {show(value)}")
    except OverflowError:  # an integer with hundreds of digits
        num = math.inf
    if not math.isfinite(num):
        raise KvsimError(f"{loc}: expected a finite byte size, got {show(value)}")
    if num < 0:
        raise KvsimError(f"{loc}: expected a byte size >= 0, got {show(value)}")
    return num


def parse_bytes(value, key="size", path=None) -> float:
    """Accept 128e9, 137438953472, '128GB', '1.5TiB' ('GB' is 1e9, 'GiB' is 2**30)."""
    return _size(value, f"{path or '<config>'}: {key}")


def knob(default=dataclasses.MISSING, *, help: str, unit: str = "", lo=None, hi=None, why: str = "",
         choices=None, size: bool = False, pattern: Optional[re.Pattern] = None):
    """A config field and everything about it: `help`; `unit`; inclusive bounds `lo`..`hi` with
    `why` they are where they are (every number has both: an unbounded one lets 1e308 through to
    the clock); `choices`; `size` (accepts 128GB, 2TiB); `pattern` (a string's shape)."""
    meta = {"help": help, "unit": unit, "lo": lo, "hi": hi, "why": why, "choices": choices, "size": size,
            "pattern": pattern}
    return field(default=default, metadata=meta)


_COUNT_WHY = "more than any replica could hold"
_BW = dict(unit="GB/s", lo=1e-3, hi=1e5, why="slower stalls a turn for hours; faster is beyond any link or "
           "drive array (NVLink-C2C: ~0.5 TB/s)")
_PRICE_GB_H = dict(unit="USD/(GB*h)", lo=0.0, hi=1.0, why="1 $/GB-hour is ~200x DRAM's rental price")


@dataclass(frozen=True)
class GpuConfig:
    name: str = knob("a100-80gb", help="named GPU (sim/models.py): its HBM, peak FLOP/s and HBM bandwidth",
                     choices=tuple(GPUS))
    count: int = knob(1, help="GPUs of one replica (tensor parallel): their HBM holds the weights and KV",
                      unit="GPUs", lo=1, hi=1024, why="more than any NVLink domain: NVL576 joins 576")
    hbm_bytes: Optional[float] = knob(None, help="HBM per GPU; unset: the named GPU's", unit="bytes", size=True,
                                      lo=1e9, hi=1e12, why="4x the largest HBM today, 256 GB")
    peak_flops: Optional[float] = knob(None, help="dense bf16 peak per GPU; unset: the named GPU's",
                                       unit="FLOP/s", lo=1e12, hi=1e17,
                                       why="10x the fastest GPU's sparse FP4")
    hbm_bw_gbps: Optional[float] = knob(None, help="HBM bandwidth per GPU; unset: the named GPU's", unit="GB/s",
                                        lo=10.0, hi=1e5, why="10x the fastest HBM, 8 TB/s")
    efficiency: str = knob("measured", choices=("measured", "constant"),
                           help="the roofline's share of the peaks: measured (per kernel and GEMM shape, from "
                                "H100 measurements, sim/efficiency.py; other GPUs use the same shares of their "
                                "peaks) or constant (gpu.prefill_mfu and gpu.decode_mbu for every shape)")
    # Vidur-style defaults: the share of peak a well-tuned engine reaches (roofline efficiency)
    prefill_mfu: float = knob(0.55, help="gpu.efficiency constant: share of peak FLOP/s every step reaches",
                              unit="fraction", lo=0.01, hi=1.0, why="no engine runs below 1% of peak")
    decode_mbu: float = knob(0.75, help="gpu.efficiency constant: share of HBM bandwidth every step reaches",
                             unit="fraction", lo=0.01, hi=1.0, why="no engine runs below 1% of peak")
    allreduce: str = knob("none", choices=("none", "ring", "table"),
                          help="tensor-parallel communication when count > 1: none (not charged), ring (two "
                               "all-reduces per layer over gpu.nvlink_gbps, sim/collectives.py) or table "
                               "(measured NCCL timings, gpu.allreduce_table)")
    nvlink_gbps: Optional[float] = knob(None, help="GPU-to-GPU link per direction; unset: the named GPU's",
                                        unit="GB/s", **{k: v for k, v in _BW.items() if k != "unit"})
    allreduce_latency_us: float = knob(0.0, help="fixed time of one ring all-reduce call (0 until measured: "
                                       "a measured gpu.allreduce_table replaces the ring)", unit="us",
                                       lo=0.0, hi=1e4, why="10 ms is 1000x NCCL's small-message time")
    allreduce_table: Optional[str] = knob(None, unit="path", help="all-reduce timings per GPU count "
                                          "(schema in sim/collectives.py), relative to the config")
    expert_parallel: bool = knob(False, help="MoE models: serve the replica's GPUs with data-parallel attention "
                                 "and expert parallelism (SGLang / vLLM 'DP attention + EP') instead of tensor "
                                 "parallelism: every GPU holds the non-expert weights whole and count-th of the "
                                 "routed experts, KV is split by requests (MLA's too), and each MoE layer pays two "
                                 "all-to-alls over gpu.nvlink_gbps with gpu.allreduce_latency_us a call (none "
                                 "when gpu.allreduce is none; no measured all-to-all table exists). Roofline "
                                 "only (sim/costmodel.py ExpertParallelCost)")
    reserved_fraction: float = knob(0.10, help="share of HBM that holds neither weights nor KV (activations, "
                                    "CUDA graphs, allocator slack)", unit="fraction", lo=0.0, hi=0.9,
                                    why="at 0.9 nothing is left for KV")

    def spec(self) -> GpuSpec:
        base = GPUS[self.name]
        return dataclasses.replace(base, hbm_bytes=self.hbm_bytes or base.hbm_bytes,
                                   peak_flops=self.peak_flops or base.peak_flops,
                                   hbm_bw_gbps=self.hbm_bw_gbps or base.hbm_bw_gbps,
                                   nvlink_gbps=self.nvlink_gbps or base.nvlink_gbps)


_SIZE_WHY = "10 PB: far beyond any machine (the largest hosts hold ~32 TB), room for 'unlimited' what-ifs"


@dataclass(frozen=True)
class HostConfig:
    dram_bytes: float = knob(128e9, help="host DRAM given to the KV store, per replica", unit="bytes", size=True,
                             lo=0.0, hi=1e16, why=_SIZE_WHY)
    h2d_gbps: float = knob(25.0, help="host-to-GPU copy bandwidth (PCIe 4.0 x16, pinned, measured-typical)", **_BW)
    d2h_gbps: float = knob(25.0, help="GPU-to-host copy bandwidth", **_BW)


@dataclass(frozen=True)
class SsdConfig:
    bytes: float = knob(2e12, help="SSD capacity given to the KV store, per replica; 0: no SSD tier",
                        unit="bytes", size=True, lo=0.0, hi=1e16, why=_SIZE_WHY)
    read_gbps: float = knob(6.0, help="SSD read bandwidth", **_BW)
    write_gbps: float = knob(3.0, help="SSD write bandwidth", **_BW)
    contention: Optional[str] = knob(
        None, choices=CONTENTION,
        help="how reads and writes slow each other (sim/tiers.py, SharedDeviceLink): none (independent "
             "directions), even_split (of the bandwidth while both are busy) or interleaved (each request "
             "waits for half the other side's request in service); unset: the hardware profile's "
             "measured ssd.contention, else none")


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = knob(64, help="running jobs (decode batch); 1 = strictly one turn at a time, FCFS",
                          unit="jobs", lo=1, hi=65536, why="vLLM's default is 256 sequences; 2**16 fits no HBM")
    max_prefill_tokens: int = knob(8192, help="new tokens computed in one prefill iteration", unit="tokens",
                                   lo=1, hi=10_000_000, why="a whole 10M-token context in one iteration")
    lookahead_jobs: int = knob(32, help="queue window seen by scheduler-aware fetch and eviction", unit="jobs",
                               lo=0, hi=1_000_000, why="more than any queue the simulator can hold")
    # the chunked scheduler's settings: vLLM 0.32.0's defaults for a GPU server (sim/scheduler.py ChunkedConfig)
    kind: str = knob("chunked", choices=SCHEDULER_KINDS,
                     help="prefill_first (whole-turn prefill iterations that pause decoding, each turn holding "
                          "HBM for its whole context and reply: CachedAttention's engine) or chunked (vLLM V1: "
                          "one token budget per step shared by decodes and prefill chunks, paged KV, recompute "
                          "preemption; sim/scheduler.py ChunkedScheduler)")
    max_num_batched_tokens: int = knob(VLLM_GPU_MAX_NUM_BATCHED_TOKENS, unit="tokens", lo=1, hi=10_000_000,
                                       why="a whole 10M-token context in one step",
                                       help="chunked: tokens one step computes, decodes and chunks together "
                                            "(vLLM's max_num_batched_tokens)")
    max_num_seqs: int = knob(VLLM_GPU_MAX_NUM_SEQS, unit="requests", lo=1, hi=65536,
                             why="2**16 sequences fit no HBM", help="chunked: running requests at most "
                             "(vLLM's max_num_seqs)")
    block_tokens: int = knob(VLLM_BLOCK_TOKENS, unit="tokens", lo=1, hi=4096,
                             why="vLLM's block sizes go up to a few hundred tokens",
                             help="chunked: tokens per paged KV block (vLLM's block_size)")
    long_prefill_token_threshold: int = knob(0, unit="tokens", lo=0, hi=10_000_000,
                                             why="the longest context windows offered are ~10M tokens",
                                             help="chunked: one request's tokens per step at most while others "
                                                  "run or wait; 0 = off (vLLM's default)")
    watermark: float = knob(0.0, unit="fraction", lo=0.0, hi=0.99, why="a share of the blocks",
                            help="chunked: share of the KV blocks an admission must leave free; 0 = off")
    preemption: str = knob("recompute", choices=PREEMPTION_MODES,
                           help="chunked: what a preempted request loses (recompute: all its KV, computed "
                                "again when it resumes, after a fresh prefix lookup; swap: its KV is copied to "
                                "host memory over D2H and back over H2D on resumption, vLLM V0's swap, while "
                                "scheduler.swap_space holds it, else recompute)")
    swap_space: float = knob(float(VLLM_SWAP_SPACE_BYTES), unit="bytes", size=True, lo=0.0, hi=1e15,
                             why="a petabyte of host memory per GPU is beyond any server",
                             help="chunked, preemption swap: host memory per replica for swapped-out KV "
                                  "(vLLM's --swap-space, 4 GiB), apart from the KV store's DRAM")


@dataclass(frozen=True)
class SyntheticConfig:
    n_sessions: int = knob(1000, help="sessions drawn by the built-in generator (when workload.trace is unset)",
                           unit="sessions", lo=1, hi=10_000_000, why="10M sessions take hours to simulate")


_TOKENS_WHY = "the longest context windows offered are ~10M tokens"


@dataclass(frozen=True)
class WorkloadConfig:
    trace: Optional[str] = knob(None, help="canonical trace file (sim/trace.py), relative to the config; "
                                "unset: the built-in synthetic generator", unit="path")
    synthetic: SyntheticConfig = knob(SyntheticConfig(), help="the built-in generator")
    session_rate_per_s: Optional[float] = knob(
        None, help="re-draw session arrivals as Poisson at this rate; unset: the trace's arrivals",
        unit="sessions/s", lo=1e-4, hi=1e5, why="one session per ~3 hours to 100k a second")
    think_time_mean_s: Optional[float] = knob(
        None, help="re-draw think times (reply to next turn) with this mean; unset: the trace's", unit="s",
        lo=0.0, hi=86400.0, why="up to a day between two turns")
    think_time_dist: str = knob("exponential", help="distribution of re-drawn think times",
                                choices=("exponential", "lognormal", "fixed"))
    think_time_sigma: float = knob(1.0, help="shape of the lognormal think times (sigma of the log)", lo=0.01,
                                   hi=4.0, why="at 4 the median is 1/3000 of the mean")
    max_sessions: Optional[int] = knob(None, help="keep the first N sessions of the trace; unset: all",
                                       unit="sessions", lo=1, hi=1_000_000_000, why="larger than any trace")
    max_output_tokens: Optional[int] = knob(None, help="cap replies (e.g. to match a GPU run's decode cap)",
                                            unit="tokens", lo=1, hi=10_000_000, why=_TOKENS_WHY)
    shared_prefix_tokens: int = knob(0, unit="tokens", lo=0, hi=10_000_000, why=_TOKENS_WHY,
                                     help="chunked: leading tokens every session's input shares (a chat "
                                          "template's system prompt): their whole blocks are one prefix-cache "
                                          "entry for all sessions; 0 = none. Part of each turn's prompt "
                                          "(of the first turn's, then of the history), not added to it")


@dataclass(frozen=True)
class RoundAttentionConfig:
    """Round Attention (arXiv 2502.15294): above the watershed layer only the top-k rounds' KV is kept."""
    enabled: bool = knob(False, help="keep only the top-k rounds' KV above the watershed layer")
    watershed_layer: int = knob(0, help="layers [0, watershed_layer) keep the whole history", unit="layers",
                                lo=0, hi=1000, why="and below the model's layers")
    kept_fraction: float = knob(1.0, help="mean share of history tokens kept above the watershed",
                                unit="fraction", lo=0.0, hi=1.0, why="a share")


POLICIES = ("recompute", "hbm_prefix", "attentionstore")


@dataclass(frozen=True)
class PolicyConfig:
    kind: str = knob("attentionstore", choices=POLICIES,
                     help="recompute (no reuse), hbm_prefix (reuse what stays in HBM) or attentionstore "
                          "(HBM, DRAM and SSD tiers, CachedAttention)")
    layerwise_preload: bool = knob(True, help="load a turn's KV layer by layer, overlapped with prefill")
    read_buffer_layers: int = knob(READ_BUFFER_LAYERS, help="layers of KV the preload may run ahead of prefill", unit="layers",
                                   lo=1, hi=1000, why="and at most the model's layers")
    async_save: bool = knob(True, help="save KV out of HBM while the GPU computes")
    scheduler_aware_fetch: bool = knob(True, help="prefetch the KV of queued jobs (look-ahead window)")
    eviction: str = knob("scheduler_aware", choices=("scheduler_aware", "lru", "fifo"),
                         help="which KV leaves a full tier (hbm_prefix: scheduler_aware means lru)")
    truncation: str = knob("decoupled_pe", choices=("decoupled_pe", "invalidate"),
                           help="on context overflow: keep the saved KV (decoupled positional encoding) "
                                "or invalidate it")
    round_attention: RoundAttentionConfig = knob(RoundAttentionConfig(), help="Round Attention")


@dataclass(frozen=True)
class PricesConfig:
    # Defaults: on-demand cloud list prices, late 2024 (A100-80GB ~ $3.7/h; DRAM and NVMe amortised)
    gpu_per_hour_usd: float = knob(3.67, help="one GPU for an hour", unit="USD/h", lo=0.0, hi=1000.0,
                                   why="a whole 8-GPU node rents for ~$100/h")
    dram_per_gb_hour_usd: float = knob(0.0044, help="one GB of host DRAM for an hour", **_PRICE_GB_H)
    ssd_per_gb_hour_usd: float = knob(0.00011, help="one GB of SSD for an hour", **_PRICE_GB_H)


@dataclass(frozen=True)
class ModelShapeConfig:
    """A model not in the named table (sim/models.py): its shape, with `model` as its name."""
    layers: int = knob(help="decoder layers", unit="layers", lo=1, hi=1000, why="the deepest LLMs have ~126")
    hidden: int = knob(help="hidden width", lo=1, hi=1_000_000, why="the widest LLMs have 16384")
    heads: int = knob(help="attention (query) heads; divides hidden", lo=1, hi=100_000, why="at most hidden")
    kv_heads: int = knob(help="key/value heads (grouped-query attention); divides heads", lo=1, hi=100_000,
                         why="at most heads")
    intermediate: int = knob(help="MLP width", lo=1, hi=10_000_000, why="the widest LLMs have ~53k")
    vocab: int = knob(help="vocabulary size", unit="tokens", lo=1, hi=10_000_000,
                      why="the largest vocabularies have ~256k")
    max_context_tokens: int = knob(help="context window", unit="tokens", lo=2, hi=10_000_000, why=_TOKENS_WHY)
    dtype_bytes: int = knob(2, help="bytes per weight and KV element (bf16 / fp16: 2)", unit="bytes", lo=1, hi=8,
                            why="fp8 to fp64")
    mlp_matrices: int = knob(3, help="MLP matrices: gated (LLaMA) 3, plain (Falcon) 2", lo=2, hi=3,
                             why="plain or gated MLP")
    # optional, as in sim/models.py ModelShape (unset / 0: a LLaMA-2-style dense, full-attention shape)
    head_dim: Optional[int] = knob(None, help="per-head width as the config states it; unset: hidden / heads",
                                   lo=1, hi=100_000, why="at most hidden")
    attention: Optional[str] = knob(None, choices=("mha", "gqa", "mla"),
                                    help="attention kind; unset: mha if kv_heads == heads else gqa (mla when "
                                         "kv_lora_rank is set)")
    kv_lora_rank: int = knob(0, help="MLA: latent width cached per token per layer", lo=0, hi=100_000,
                             why="at most hidden")
    qk_rope_head_dim: int = knob(0, help="MLA: decoupled RoPE key width cached with the latent", lo=0,
                                 hi=100_000, why="at most hidden")
    qk_nope_head_dim: int = knob(0, help="MLA: per-head query/key width without RoPE", lo=0, hi=100_000,
                                 why="at most hidden")
    v_head_dim: int = knob(0, help="MLA: per-head value width", lo=0, hi=100_000, why="at most hidden")
    q_lora_rank: int = knob(0, help="MLA: query latent width; 0: queries projected directly", lo=0,
                            hi=100_000, why="at most hidden")
    sliding_window: int = knob(0, help="tokens a sliding-window layer attends and keeps; 0: none",
                               unit="tokens", lo=0, hi=10_000_000, why=_TOKENS_WHY)
    full_attention_interval: int = knob(0, help="every N-th layer attends the whole context, the others "
                                        "slide; 0: every layer slides (with sliding_window)", lo=0, hi=1000,
                                        why="at most the layers")
    experts: int = knob(0, help="routed experts per MoE layer; 0: dense MLP", lo=0, hi=100_000,
                        why="the largest MoEs route over a few hundred")
    experts_per_token: int = knob(0, help="routed experts each token uses (top-k)", lo=0, hi=100_000,
                                  why="at most experts")
    shared_experts: int = knob(0, help="experts every token uses", lo=0, hi=1000, why="a handful at most")
    expert_intermediate: int = knob(0, help="one expert's MLP width", lo=0, hi=10_000_000,
                                    why="the widest MLPs have ~53k")
    dense_layers: int = knob(0, help="first layers with a dense MLP in a MoE model", unit="layers", lo=0,
                             hi=1000, why="at most the layers")
    kv_dtype_bytes: Optional[int] = knob(None, help="bytes per KV element (fp8 KV: 1); unset: dtype_bytes",
                                         unit="bytes", lo=1, hi=8, why="fp8 to fp64")
    expert_dtype_bytes: Optional[float] = knob(None, help="bytes per routed-expert weight (MXFP4: 0.53125); "
                                               "unset: dtype_bytes", unit="bytes", lo=0.25, hi=8,
                                               why="2-bit to fp64")


@dataclass(frozen=True)
class Config:
    name: str = knob("run", help="run name: results go to results/<name>/ ('/' nests folders)",
                     pattern=_NAME_RE)
    seed: int = knob(0, help="seed of every random draw (synthetic sessions, re-drawn arrivals and think times)",
                     lo=0, hi=2**32 - 1, why="32 bits are plenty for any sweep")
    model: str = knob("llama2-13b", help=f"a named shape ({', '.join(MODELS)}) or the name of model_shape")
    model_shape: Optional[ModelShapeConfig] = knob(None, help="shape of a model not in the named table")
    max_context_tokens: Optional[int] = knob(None, help="context window; unset: the model's own", unit="tokens",
                                             lo=2, hi=10_000_000, why=_TOKENS_WHY)
    gpu: GpuConfig = knob(GpuConfig(), help="the GPUs of one replica")
    hardware_profile: Optional[str] = knob(
        None, unit="path", help="YAML written by `kvsim gpu calibrate`, relative to the config; replaces the "
                                "roofline costs")
    host: HostConfig = knob(HostConfig(), help="host DRAM tier")
    ssd: SsdConfig = knob(SsdConfig(), help="SSD tier")
    scheduler: SchedulerConfig = knob(SchedulerConfig(), help="batching and look-ahead")
    workload: WorkloadConfig = knob(WorkloadConfig(), help="which sessions arrive when")
    policy: PolicyConfig = knob(PolicyConfig(), help="the KV-reuse policy and its mechanisms")
    prices: PricesConfig = knob(PricesConfig(), help="prices behind the cost figures")
    source: Optional[str] = field(default=None, compare=False, metadata={"internal": True})

    def shape(self) -> ModelShape:
        m = ModelShape(self.model, **dataclasses.asdict(self.model_shape)) if self.model_shape else MODELS[self.model]
        if self.max_context_tokens:
            m = dataclasses.replace(m, max_context_tokens=self.max_context_tokens)
        return m


# ---------------------------------------------------------------- overrides (--set KEY=VALUE)

class Overrides(dict):
    """Dotted key -> value, remembering where each came from (`origins`, e.g. '--set'), so that an
    error in an override names it, not the config file that does not contain it."""

    def __init__(self, values=(), origin: Optional[str] = None):
        super().__init__(values)
        self.origins = {k: origin for k in self} if origin else {}

    def merged(self, more: dict, origin: Optional[str] = None) -> "Overrides":
        """These overrides plus `more` (which win), each keeping its origin."""
        out = Overrides({**self, **more})
        out.origins = {**{k: o for k, o in self.origins.items() if k not in more},
                       **({k: origin for k in more} if origin else {})}
        return out


def parse_overrides(items, example: str = "host.dram_bytes=256GB", flag: str = "--set") -> Overrides:
    """`--set KEY=VALUE` items -> Overrides, each value typed as YAML reads it (3, true, 128GB).

    The one parser of overrides: `kvsim run`, `kvsim plan` and the bench scripts call it."""
    out = Overrides()
    for item in items or []:
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise KvsimError(f"{flag} {show(item)}: expected KEY=VALUE, e.g. {flag} {example}")
        try:
            value = parse_yaml(v)
        except KvsimError as exc:
            raise KvsimError(f"{flag} {show(item)}: the value is not valid YAML ({exc}); expected e.g. "
                             f"{flag} {example}") from None
        if k in out:
            raise KvsimError(f"{flag} {k}: given twice ({show(out[k])} and {show(value)}); expected it once")
        out[k] = value
        out.origins[k] = flag
    return out


class _Where:
    """Where a dotted key's value came from, as an error prefix: 'file: key', or '--set key' when an
    override put it there (or put a mapping above it, or named a key below it the file lacks)."""

    def __init__(self, path: str, file_raw: dict, overrides: dict):
        self.path, self.file_raw = path, file_raw
        self.origins = getattr(overrides, "origins", {})

    def __call__(self, key: str) -> str:
        for k, origin in self.origins.items():
            if key == k or key.startswith(k + ".") or (k.startswith(key + ".") and not _has(self.file_raw, key)):
                return f"{origin} {key}"
        return f"{self.path}: {key}" if key else self.path


def _has(raw, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ---------------------------------------------------------------- validation

def _describe(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _num(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _bounds_text(meta) -> str:
    lo, hi, unit = meta["lo"], meta["hi"], meta["unit"]
    if meta["size"]:
        return f"{_bytes_text(lo)} to {_bytes_text(hi)}"
    return f"{_num(lo)} to {_num(hi)}{' ' + unit if unit and unit != 'fraction' else ''}"


def _bytes_text(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _build(cls, raw: Any, prefix: str, where: _Where):
    if not isinstance(raw, dict):
        raise KvsimError(f"{where(prefix) if prefix else where.path + ': top level'}: expected a mapping, "
                         f"got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted((k for k in raw if k not in fields), key=str)  # YAML keys may be numbers or null
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        names = sorted(fields)
        if len(names) <= 16:
            raise KvsimError(f"{where(key)}: unknown key; expected one of {', '.join(names)}")
        # a long list would not fit one line: the nearest names, and where all of them are listed
        near = difflib.get_close_matches(str(unknown[0]), names, n=3)
        raise KvsimError(f"{where(key)}: unknown key; expected a key of {prefix or 'the config'} "
                         f"(`kvsim config keys` lists them){'; nearest: ' + ', '.join(near) if near else ''}")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise KvsimError(f"{where(key)}: missing; expected {_describe(hints[missing[0]])}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key, where, fields[name].metadata)
    return cls(**kwargs)


def _coerce(tp, value, key, where: _Where, meta):
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key, where)
    loc, given = where(key), value
    what = "a byte size" if meta.get("size") else _describe(tp)
    if meta.get("size"):
        value = _size(value, loc)
    elif tp is bool:
        if not isinstance(value, bool):
            raise KvsimError(f"{loc}: expected true or false, got {show(value)}")
    elif tp is int:
        if isinstance(value, str):
            try:  # YAML reads 1e6 without a dot as a string
                value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
            except ValueError:  # not a number, or more digits than Python converts
                raise KvsimError(f"{loc}: expected an integer, got {show(value)}") from None
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise KvsimError(f"{loc}: expected an integer, got {show(value)}")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e9 without a dot as a string
            except ValueError:
                raise KvsimError(f"{loc}: expected a number, got {show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KvsimError(f"{loc}: expected a number, got {show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer with hundreds of digits
            value = math.inf
        if not math.isfinite(value):
            raise KvsimError(f"{loc}: expected a finite number, got {show(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise KvsimError(f"{loc}: expected a string, got {show(value)}")
    choices, pattern = meta.get("choices"), meta.get("pattern")
    if choices is not None and value not in choices:
        raise KvsimError(f"{loc}: expected one of {', '.join(choices)}, got {show(value)}")
    if pattern is not None and not (pattern.match(value) and ".." not in value.split("/")):
        raise KvsimError(f"{loc}: expected letters, digits, '_', '-', '.' (and '/' between them), got {show(value)}")
    if meta.get("lo") is not None and not meta["lo"] <= value <= meta["hi"]:
        why = f" ({meta['why']})" if meta.get("why") else ""
        raise KvsimError(f"{loc}: expected {what} from {_bounds_text(meta)}{why}, got {show(given)}")
    return value


def _set_dotted(raw: dict, dotted: str, value, where: _Where) -> dict:
    """`raw` with `dotted` set to `value`: the mappings on the path are copied, never mutated (the
    file's own mappings may be shared by YAML aliases, and a deep copy of an alias bomb explodes)."""
    parts = dotted.split(".")
    root = node = dict(raw)
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise KvsimError(f"{where(dotted)}: cannot set inside {'.'.join(parts[:i + 1])}, which is "
                             f"{show(nxt)}, not a mapping")
        node[p] = nxt = dict(nxt)
        node = nxt
    node[parts[-1]] = value
    return root


def load_config(source: Union[str, Path, dict], overrides: Optional[dict] = None) -> Config:
    """Read YAML (or take a dict), apply dotted-path overrides, validate, return a frozen Config.

    Relative paths inside the file (trace, hardware profile) resolve against the file's folder
    first and the current directory second, so configs work from anywhere. An error in an
    override from `parse_overrides` names `--set KEY`; any other names the file and the key.
    """
    if isinstance(source, dict):
        raw, path, base = source, "<config>", Path.cwd()
    else:
        path = str(source)
        p = Path(source)
        raw = read_yaml(p, "config file")
        if raw is None:
            raise KvsimError(f"{path}: the config file is empty; expected config keys (write {{}} for "
                             f"every default)")
        base = p.resolve().parent
    if not isinstance(raw, dict):
        raise KvsimError(f"{path}: top level: expected a mapping of config keys, got {type(raw).__name__}")
    where = _Where(path, raw, overrides or {})
    for dotted, value in (overrides or {}).items():
        raw = _set_dotted(raw, dotted, value, where)
    cfg = _build(Config, raw, "", where)
    cfg = dataclasses.replace(cfg, source=path)
    cfg = _resolve_paths(cfg, base, where)
    _check_consistency(cfg, where)
    return cfg


def _resolve(p: Optional[str], base: Path, key: str, where: _Where) -> Optional[str]:
    if p is None:
        return None
    if not p.strip():
        raise KvsimError(f"{where(key)}: expected the path of a file, got {show(p)}")
    for cand in (base / p, Path.cwd() / p, Path(p)):
        try:
            if cand.is_file():
                return str(cand.resolve())
        except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
            raise KvsimError(f"{where(key)}: expected the path of a file, got {show(p)}") from None
    raise KvsimError(f"{where(key)}: file {show(p, 200)} not found (looked next to the config and in the current directory)")


def _resolve_paths(cfg: Config, base: Path, where: _Where) -> Config:
    wl = dataclasses.replace(cfg.workload, trace=_resolve(cfg.workload.trace, base, "workload.trace", where))
    prof = _resolve(cfg.hardware_profile, base, "hardware_profile", where)
    gpu = dataclasses.replace(cfg.gpu, allreduce_table=_resolve(cfg.gpu.allreduce_table, base,
                                                                "gpu.allreduce_table", where))
    return dataclasses.replace(cfg, workload=wl, hardware_profile=prof, gpu=gpu)


def _check_consistency(cfg: Config, where: _Where) -> None:
    ms = cfg.model_shape
    if ms is None and cfg.model not in MODELS:
        raise KvsimError(f"{where('model')}: expected one of {', '.join(MODELS)} (or a model_shape), got {show(cfg.model)}")
    if ms is not None and ms.head_dim is None and ms.hidden % ms.heads:
        raise KvsimError(f"{where('model_shape.heads')}: expected a divisor of hidden ({ms.hidden}), got {ms.heads}")
    if ms is not None and ms.heads % ms.kv_heads:
        raise KvsimError(f"{where('model_shape.kv_heads')}: expected a divisor of heads ({ms.heads}), got {ms.kv_heads}")
    shape = cfg.shape()
    ra = cfg.policy.round_attention
    if ra.enabled and ra.watershed_layer >= shape.layers:
        raise KvsimError(f"{where('policy.round_attention.watershed_layer')}: expected < {shape.layers} "
                         f"(layers of {cfg.model}), got {ra.watershed_layer}")
    if ra.enabled and cfg.policy.kind != "attentionstore":
        raise KvsimError(f"{where('policy.round_attention.enabled')}: needs policy.kind attentionstore, "
                         f"got {cfg.policy.kind}")
    if cfg.gpu.allreduce == "table" and not cfg.gpu.allreduce_table:
        raise KvsimError(f"{where('gpu.allreduce_table')}: gpu.allreduce table needs the table's path")
    if cfg.gpu.allreduce == "ring" and not cfg.gpu.spec().nvlink_gbps:
        raise KvsimError(f"{where('gpu.nvlink_gbps')}: gpu.allreduce ring needs the link's GB/s ({cfg.gpu.name} "
                         f"states none)")
    if cfg.gpu.expert_parallel:
        if cfg.gpu.count < 2:
            raise KvsimError(f"{where('gpu.expert_parallel')}: needs gpu.count >= 2, got gpu.count {cfg.gpu.count}")
        if not shape.experts:
            raise KvsimError(f"{where('gpu.expert_parallel')}: needs a MoE model (experts > 0); {cfg.model} is dense")
        if shape.experts % cfg.gpu.count:
            raise KvsimError(f"{where('gpu.expert_parallel')}: needs gpu.count to divide the {shape.experts} experts "
                             f"of {cfg.model} (whole experts per GPU), got gpu.count {cfg.gpu.count}")
        if cfg.hardware_profile:
            raise KvsimError(f"{where('gpu.expert_parallel')}: a measured hardware_profile times tensor-parallel "
                             "layers, not expert parallelism; expected no hardware_profile (the roofline)")
        if cfg.gpu.allreduce != "none" and not cfg.gpu.spec().nvlink_gbps:
            raise KvsimError(f"{where('gpu.expert_parallel')}: the all-to-alls need gpu.nvlink_gbps ({cfg.gpu.name} "
                             "states none)")
    if ms is not None and ms.experts and not (0 < ms.experts_per_token <= ms.experts and ms.expert_intermediate):
        raise KvsimError(f"{where('model_shape.experts_per_token')}: a MoE shape needs 1 <= experts_per_token "
                         f"<= experts ({ms.experts}) and expert_intermediate > 0")
    if ms is not None and (ms.attention == "mla" or ms.kv_lora_rank) and not (ms.kv_lora_rank and ms.qk_rope_head_dim):
        raise KvsimError(f"{where('model_shape.kv_lora_rank')}: mla needs kv_lora_rank and qk_rope_head_dim > 0")
    if cfg.policy.read_buffer_layers > shape.layers:
        raise KvsimError(f"{where('policy.read_buffer_layers')}: expected <= {shape.layers} (layers of {cfg.model})")


# dotted keys added after sweeps were keyed: left at their defaults, they stay out of the resolved config
_KEYED_WHEN_SET = frozenset(
    [f"gpu.{k}" for k in ("allreduce", "nvlink_gbps", "allreduce_latency_us", "allreduce_table", "expert_parallel")]
    + [f"model_shape.{k}" for k in (
        "head_dim", "attention", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank",
        "sliding_window", "full_attention_interval", "experts", "experts_per_token", "shared_experts",
        "expert_intermediate", "dense_layers", "kv_dtype_bytes", "expert_dtype_bytes")]
    + [f"scheduler.{k}" for k in ("kind", "max_num_batched_tokens", "max_num_seqs", "block_tokens",
                                  "long_prefill_token_threshold", "watermark", "preemption", "swap_space")]
    + ["workload.shared_prefix_tokens"])


def config_to_dict(cfg: Config) -> dict:
    """Fully resolved config as plain types: what a sweep hashes to key its points."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    if d["model_shape"] is None:
        del d["model_shape"]  # a named model keys exactly as before model_shape existed
    # keys added later key a config that leaves them at their defaults exactly as before they existed
    for section, cls in (("gpu", GpuConfig), ("model_shape", ModelShapeConfig), ("scheduler", SchedulerConfig),
                         ("workload", WorkloadConfig)):
        for f in dataclasses.fields(cls):
            if f"{section}.{f.name}" in _KEYED_WHEN_SET and section in d and d[section].get(f.name) == f.default:
                del d[section][f.name]
    return d


# ---------------------------------------------------------------- every key, for `kvsim config keys`

@dataclass(frozen=True)
class KeyDoc:
    """One dotted config key as `kvsim config keys` lists it, read from the field's metadata."""
    key: str
    type: str
    default: str
    unit: str
    bounds: str
    choices: str
    help: str


def _type_text(tp, meta) -> str:
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        tp = next(a for a in get_args(tp) if a is not type(None))
    name = "size" if meta.get("size") else {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, str(tp))
    return f"{name} or null" if optional else name


def _default_text(f, meta) -> str:
    if f.default is dataclasses.MISSING:
        return "(required)"
    if f.default is None:
        return "null"
    if meta.get("size"):
        return _bytes_text(f.default)
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return _num(f.default) if isinstance(f.default, (int, float)) else str(f.default)


def config_keys(cls=Config, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the config (nested sections and model_shape included), with its metadata."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key, tp, meta = f"{prefix}{f.name}", hints[f.name], f.metadata
        inner = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if dataclasses.is_dataclass(inner):
            out += config_keys(inner, key + ".")
            continue
        bounds = _bounds_text(meta) + (f" ({meta['why']})" if meta.get("why") else "") if meta.get("lo") is not None else ""
        out.append(KeyDoc(key, _type_text(tp, meta), _default_text(f, meta), meta.get("unit", ""), bounds,
                          ", ".join(meta.get("choices") or ()), meta.get("help", "")))
    return out


def format_config_keys(fmt: str = "text") -> str:
    """`kvsim config keys`: one entry per key (text), or one Markdown table (fmt 'markdown')."""
    keys = config_keys()
    if fmt == "markdown":
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = ["| key | type | default | unit | bounds | choices | help |", "|---|---|---|---|---|---|---|"]
        lines += [f"| `{k.key}` | {k.type} | {esc(k.default)} | {esc(k.unit)} | {esc(k.bounds)} | {esc(k.choices)} "
                  f"| {esc(k.help)} |" for k in keys]
        return "\n".join(lines)
    lines = []
    for k in keys:
        head = f"{k.key}  ({k.type}, default {k.default}{', ' + k.unit if k.unit else ''})"
        lines.append(head)
        lines.append(f"    {k.help}")
        if k.bounds:
            lines.append(f"    bounds: {k.bounds}")
        if k.choices:
            lines.append(f"    choices: {k.choices}")
    return "\n".join(lines)
