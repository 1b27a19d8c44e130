"""What a tensor-parallel all-reduce costs: a measured NCCL table, or a ring over a named link.

Megatron-style tensor parallelism (Shoeybi et al. 2019, §3) splits each layer's attention and MLP
across the GPUs and joins their partial outputs with two all-reduces of the activations per layer
(after attention's output projection, after the MLP's down projection). `allreduce_bytes_per_layer`
is that traffic; an `AllReduceCost` prices one call at a message size for a TP degree:
  * `RingAllReduce`: NCCL's ring algorithm moves 2 (p-1)/p of the message over each GPU's link (the
    `busbw` convention of nccl-tests), plus a fixed time per call;
  * `AllReduceTable`: `all_reduce_perf` timings per TP degree (file schema below), interpolated
    linearly in the message size, clamped at the smallest size (latency floor), extrapolated with the
    last segment's slope past the largest.

Expert parallelism (`gpu.expert_parallel`) replaces a MoE layer's all-reduces by two all-to-alls, as
DeepSeek-V3 and Qwen3-MoE are served with data-parallel attention and the routed experts spread over
the GPUs (SGLang / vLLM "DP attention + EP"): dispatch sends each token's hidden state to the GPUs of
its top-k experts, combine brings their outputs back. `alltoall_bytes_per_gpu` is what one GPU sends
in one of them; `LinkAllToAll` prices it over the GPU link (NVSwitch: every GPU sends and receives at
its link's rate at once), plus a fixed time per call. No all-to-all has been measured: there is no
table for it.

All-reduce table schema `kvsim-allreduce-table/1` (YAML):
  schema, device, measured_at, command     provenance
  tp: {<gpus>: {bytes: [ascending sizes], us: [time of one all-reduce]}}
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Protocol

from sim.errors import KvsimError, read_yaml
from sim.models import ACTIVATION_BYTES, ModelShape
from sim.units import GB, US

SCHEMA = "kvsim-allreduce-table/1"
ALLREDUCES_PER_LAYER = 2  # attention output, MLP output


def allreduce_bytes_per_layer(shape: ModelShape, tokens: float) -> float:
    """Bytes of one of the layer's all-reduces: every token's hidden state, in bf16."""
    return tokens * shape.hidden * ACTIVATION_BYTES


ALLTOALLS_PER_MOE_LAYER = 2  # dispatch, combine


def alltoall_bytes_per_gpu(shape: ModelShape, tokens: float, gpus: int) -> float:
    """Bytes one GPU holding `tokens` tokens sends in one of a MoE layer's all-to-alls: each token's
    hidden state in bf16 once per chosen expert, the (gpus - 1) / gpus of them on other GPUs."""
    return tokens * shape.experts_per_token * (gpus - 1) / gpus * shape.hidden * ACTIVATION_BYTES


@dataclass(frozen=True)
class LinkAllToAll:
    """One all-to-all in which each GPU sends `nbytes` over its own link of `link_gbps` per direction,
    `latency_s` per call."""
    link_gbps: float
    latency_s: float = 0.0

    def __call__(self, nbytes: float, gpus: int) -> float:
        if gpus <= 1 or nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / (self.link_gbps * GB)


class AllReduceCost(Protocol):
    def __call__(self, nbytes: float, gpus: int) -> float: ...


@dataclass(frozen=True)
class RingAllReduce:
    """Ring all-reduce over `link_gbps` per direction per GPU, `latency_s` per call."""
    link_gbps: float
    latency_s: float = 0.0

    def __call__(self, nbytes: float, gpus: int) -> float:
        if gpus <= 1 or nbytes <= 0:
            return 0.0
        return self.latency_s + 2.0 * (gpus - 1) / gpus * nbytes / (self.link_gbps * GB)


@dataclass(frozen=True)
class AllReduceTable:
    """Measured all-reduce time (seconds) against message bytes, per TP degree."""
    tables: dict  # gpus -> (bytes tuple, seconds tuple)
    path: str = ""

    def __call__(self, nbytes: float, gpus: int) -> float:
        if gpus <= 1 or nbytes <= 0:
            return 0.0
        if gpus not in self.tables:
            raise KvsimError(f"{self.path}: tp: no all-reduce timings for {gpus} GPUs; measured for "
                             f"{', '.join(str(g) for g in sorted(self.tables))}")
        xs, ys = self.tables[gpus]
        if nbytes <= xs[0] or len(xs) == 1:
            return ys[0] if nbytes <= xs[0] else ys[0] * nbytes / xs[0]
        i = min(bisect.bisect_right(xs, nbytes) - 1, len(xs) - 2)
        return ys[i] + (ys[i + 1] - ys[i]) * (nbytes - xs[i]) / (xs[i + 1] - xs[i])


def parse_allreduce_table(raw, path: str = "<all-reduce table>") -> AllReduceTable:
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        got = raw.get("schema") if isinstance(raw, dict) else raw
        raise KvsimError(f"{path}: schema: expected {SCHEMA!r}, got {got!r}")
    tp = raw.get("tp")
    if not isinstance(tp, dict) or not tp:
        raise KvsimError(f"{path}: tp: expected a mapping of GPU count -> {{bytes: [...], us: [...]}}")
    tables = {}
    for g, t in tp.items():
        key = f"tp.{g}"
        if not isinstance(g, int) or isinstance(g, bool) or g < 2:
            raise KvsimError(f"{path}: {key}: expected a GPU count >= 2")
        if not isinstance(t, dict) or set(t) != {"bytes", "us"}:
            raise KvsimError(f"{path}: {key}: expected exactly the keys bytes and us")
        xs, ys = t["bytes"], t["us"]
        for name, v in (("bytes", xs), ("us", ys)):
            if (not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and math.isfinite(x) and x > 0 for x in v)):
                raise KvsimError(f"{path}: {key}.{name}: expected a non-empty list of finite numbers > 0")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise KvsimError(f"{path}: {key}.bytes: expected strictly ascending sizes")
        if len(xs) != len(ys):
            raise KvsimError(f"{path}: {key}.us: expected {len(xs)} values (one per size)")
        tables[g] = (tuple(float(x) for x in xs), tuple(float(y) * US for y in ys))
    return AllReduceTable(tables, path)


def load_allreduce_table(path) -> AllReduceTable:
    return parse_allreduce_table(read_yaml(path, "all-reduce table"), str(path))
