"""Run configuration: YAML -> frozen dataclasses, validated once at the edge.

Every error names the file, the dotted key and what was expected, so `kvsim` can print it on one
line. The rest of the code trusts these objects. Units are in the field names.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from sim.errors import KvsimError, read_yaml
from sim.models import GPUS, MODELS, GpuSpec, ModelShape
from sim.costmodel import CONTENTION

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}
_SIZE_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value, key="size", path=None) -> float:
    """Accept 128e9, 137438953472, '128GB', '1.5TiB' ('GB' is 1e9, 'GiB' is 2**30)."""
    if isinstance(value, bool):
        raise KvsimError(f"{path or '<config>'}: {key}: expected a byte size like 128GB, got {value!r}")
    if isinstance(value, (int, float)):
        num = float(value)
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m.group(2).upper() in _SIZE_UNITS:
        num = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    else:
        raise KvsimError(f"{path or '<config>'}: {key}: expected a byte size like 128GB or 2TiB, got {value!r}")
    if not math.isfinite(num) or num < 0:
        raise KvsimError(f"{path or '<config>'}: {key}: expected a byte size >= 0, got {value!r}")
    return num


def _bytes_field(default):
    return field(default=default, metadata={"bytes": True})


@dataclass(frozen=True)
class GpuConfig:
    name: str = "a100-80gb"
    count: int = 1
    hbm_bytes: Optional[float] = _bytes_field(None)  # None: from the named GPU
    peak_flops: Optional[float] = None
    hbm_bw_gbps: Optional[float] = None
    # fraction of peak a well-tuned engine reaches (roofline efficiency), Vidur-style defaults
    prefill_mfu: float = 0.55
    decode_mbu: float = 0.75
    # activations, CUDA graphs and allocator slack: share of HBM that holds neither weights nor KV
    reserved_fraction: float = 0.10

    def spec(self) -> GpuSpec:
        base = GPUS[self.name]
        return GpuSpec(self.name, self.hbm_bytes or base.hbm_bytes, self.peak_flops or base.peak_flops,
                       self.hbm_bw_gbps or base.hbm_bw_gbps)


@dataclass(frozen=True)
class HostConfig:
    dram_bytes: float = _bytes_field(128e9)  # host DRAM given to the KV store, per replica
    h2d_gbps: float = 25.0  # PCIe 4.0 x16, pinned, measured-typical
    d2h_gbps: float = 25.0


@dataclass(frozen=True)
class SsdConfig:
    bytes: float = _bytes_field(2e12)
    read_gbps: float = 6.0
    write_gbps: float = 3.0
    # How reads and writes slow each other (sim/tiers.py, SharedDeviceLink): none (independent
    # directions), even_split (of the bandwidth while both are busy) or interleaved (each request
    # waits for half the other side's request in service). Unset: the hardware profile's measured
    # `ssd.contention`, else none.
    contention: Optional[str] = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 64  # running jobs (decode batch); 1 = strictly one turn at a time, FCFS
    max_prefill_tokens: int = 8192  # new tokens computed in one prefill iteration
    lookahead_jobs: int = 32  # queue window seen by scheduler-aware fetch and eviction


@dataclass(frozen=True)
class SyntheticConfig:
    n_sessions: int = 1000


@dataclass(frozen=True)
class WorkloadConfig:
    trace: Optional[str] = None  # canonical trace (sim/trace.py); None: built-in synthetic generator
    synthetic: SyntheticConfig = SyntheticConfig()
    session_rate_per_s: Optional[float] = None  # re-draw session arrivals as Poisson at this rate
    think_time_mean_s: Optional[float] = None  # re-draw think times with this mean ...
    think_time_dist: str = "exponential"  # ... from exponential | lognormal | fixed
    think_time_sigma: float = 1.0  # shape of the lognormal (sigma of the log)
    max_sessions: Optional[int] = None  # keep the first N sessions of the trace
    max_output_tokens: Optional[int] = None  # cap replies (e.g. to match a GPU run's decode cap)


@dataclass(frozen=True)
class RoundAttentionConfig:
    """Round Attention (arXiv 2502.15294): above the watershed layer only the top-k rounds' KV is kept."""
    enabled: bool = False
    watershed_layer: int = 0
    kept_fraction: float = 1.0


@dataclass(frozen=True)
class PolicyConfig:
    kind: str = "attentionstore"  # recompute | hbm_prefix | attentionstore
    layerwise_preload: bool = True
    read_buffer_layers: int = 2
    async_save: bool = True
    scheduler_aware_fetch: bool = True
    eviction: str = "scheduler_aware"  # scheduler_aware | lru | fifo (hbm_prefix: scheduler_aware means lru)
    truncation: str = "decoupled_pe"  # decoupled_pe | invalidate
    round_attention: RoundAttentionConfig = RoundAttentionConfig()


@dataclass(frozen=True)
class PricesConfig:
    # Defaults: on-demand cloud list prices, late 2024 (A100-80GB ~ $3.7/h; DRAM and NVMe amortised)
    gpu_per_hour_usd: float = 3.67
    dram_per_gb_hour_usd: float = 0.0044
    ssd_per_gb_hour_usd: float = 0.00011


@dataclass(frozen=True)
class ModelShapeConfig:
    """A model not in the named table (sim/models.py): its shape, with `model` as its name."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int  # MLP width
    vocab: int
    max_context_tokens: int
    dtype_bytes: int = 2  # bf16 / fp16
    mlp_matrices: int = 3  # gated MLP (LLaMA) 3, plain MLP (Falcon) 2


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    model: str = "llama2-13b"  # a named shape (sim/models.py), or the name of model_shape
    model_shape: Optional[ModelShapeConfig] = None  # None: `model` is a named shape
    max_context_tokens: Optional[int] = None  # None: the model's own window
    gpu: GpuConfig = GpuConfig()
    hardware_profile: Optional[str] = None  # YAML written by `kvsim gpu calibrate`; replaces the roofline
    host: HostConfig = HostConfig()
    ssd: SsdConfig = SsdConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    workload: WorkloadConfig = WorkloadConfig()
    policy: PolicyConfig = PolicyConfig()
    prices: PricesConfig = PricesConfig()
    source: Optional[str] = field(default=None, compare=False, metadata={"internal": True})

    def shape(self) -> ModelShape:
        m = ModelShape(self.model, **dataclasses.asdict(self.model_shape)) if self.model_shape else MODELS[self.model]
        if self.max_context_tokens:
            m = dataclasses.replace(m, max_context_tokens=self.max_context_tokens)
        return m


POLICIES = ("recompute", "hbm_prefix", "attentionstore")
_CHOICES = {  # `model` is checked against MODELS once we know whether model_shape defines it
    "gpu.name": GPUS,
    "policy.kind": POLICIES,
    "ssd.contention": CONTENTION,
    "policy.eviction": ("scheduler_aware", "lru", "fifo"),
    "policy.truncation": ("decoupled_pe", "invalidate"),
    "workload.think_time_dist": ("exponential", "lognormal", "fixed"),
}
_MIN = {  # key: (lower bound, inclusive)
    "gpu.count": (1, True), "gpu.prefill_mfu": (0, False), "gpu.decode_mbu": (0, False),
    "gpu.hbm_bytes": (0, False), "gpu.peak_flops": (0, False), "gpu.hbm_bw_gbps": (0, False),
    "gpu.reserved_fraction": (0, True), "host.dram_bytes": (0, True), "host.h2d_gbps": (0, False),
    "host.d2h_gbps": (0, False), "ssd.bytes": (0, True), "ssd.read_gbps": (0, False),
    "ssd.write_gbps": (0, False), "scheduler.max_batch": (1, True), "scheduler.max_prefill_tokens": (1, True),
    "scheduler.lookahead_jobs": (0, True), "workload.synthetic.n_sessions": (1, True),
    "workload.session_rate_per_s": (0, False), "workload.think_time_mean_s": (0, True),
    "workload.think_time_sigma": (0, False),
    "workload.max_sessions": (1, True), "workload.max_output_tokens": (1, True),
    "policy.read_buffer_layers": (1, True), "policy.round_attention.watershed_layer": (0, True),
    "policy.round_attention.kept_fraction": (0, True), "max_context_tokens": (2, True),
    "prices.gpu_per_hour_usd": (0, True), "prices.dram_per_gb_hour_usd": (0, True),
    "prices.ssd_per_gb_hour_usd": (0, True), "seed": (0, True),
    "model_shape.layers": (1, True), "model_shape.hidden": (1, True), "model_shape.heads": (1, True),
    "model_shape.kv_heads": (1, True), "model_shape.intermediate": (1, True), "model_shape.vocab": (1, True),
    "model_shape.max_context_tokens": (2, True), "model_shape.dtype_bytes": (1, True),
    "model_shape.mlp_matrices": (2, True),
}
_MAX = {"gpu.reserved_fraction": 0.9, "policy.round_attention.kept_fraction": 1.0,
        "gpu.prefill_mfu": 1.0, "gpu.decode_mbu": 1.0}


def _describe(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _build(cls, raw: Any, prefix: str, path: str):
    if not isinstance(raw, dict):
        raise KvsimError(f"{path}: {prefix or 'top level'}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise KvsimError(f"{path}: {key}: unknown key; expected one of {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise KvsimError(f"{path}: {key}: missing; expected {_describe(hints[missing[0]])}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key, path, fields[name])
    return cls(**kwargs)


def _coerce(tp, value, key, path, fld):
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key, path)
    if fld.metadata.get("bytes"):
        value = parse_bytes(value, key, path)
    elif tp is bool:
        if not isinstance(value, bool):
            raise KvsimError(f"{path}: {key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise KvsimError(f"{path}: {key}: expected an integer, got {value!r}")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e9 without a dot as a string
            except ValueError:
                raise KvsimError(f"{path}: {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KvsimError(f"{path}: {key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise KvsimError(f"{path}: {key}: expected a string, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise KvsimError(f"{path}: {key}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key in _MIN and value is not None:
        lo, inclusive = _MIN[key]
        if value < lo or (value == lo and not inclusive):
            raise KvsimError(f"{path}: {key}: expected a value {'>=' if inclusive else '>'} {lo}, got {value!r}")
    if key in _MAX and value is not None and value > _MAX[key]:
        raise KvsimError(f"{path}: {key}: expected a value <= {_MAX[key]}, got {value!r}")
    return value


def _set_dotted(raw: dict, dotted: str, value, path):
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise KvsimError(f"{path}: {dotted}: cannot set inside {p!r}, which is not a mapping")
        node = nxt
    node[parts[-1]] = value


def load_config(source: Union[str, Path, dict], overrides: Optional[dict] = None) -> Config:
    """Read YAML (or take a dict), apply dotted-path overrides, validate, return a frozen Config.

    Relative paths inside the file (trace, hardware profile) resolve against the file's folder
    first and the current directory second, so configs work from anywhere.
    """
    if isinstance(source, dict):
        raw, path, base = dict(source), "<config>", Path.cwd()
    else:
        path = str(source)
        p = Path(source)
        raw = read_yaml(p, "config file")
        raw = raw if raw is not None else {}
        base = p.resolve().parent
    if not isinstance(raw, dict):
        raise KvsimError(f"{path}: top level: expected a mapping of config keys")
    raw = _deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, path)
    cfg = _build(Config, raw, "", path)
    cfg = dataclasses.replace(cfg, source=path)
    cfg = _resolve_paths(cfg, base, path)
    _check_consistency(cfg, path)
    return cfg


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _resolve(p: Optional[str], base: Path, key: str, path: str) -> Optional[str]:
    if p is None:
        return None
    for cand in (base / p, Path.cwd() / p, Path(p)):
        if cand.exists():
            return str(cand.resolve())
    raise KvsimError(f"{path}: {key}: file {p!r} not found (looked next to the config and in the current directory)")


def _resolve_paths(cfg: Config, base: Path, path: str) -> Config:
    wl = dataclasses.replace(cfg.workload, trace=_resolve(cfg.workload.trace, base, "workload.trace", path))
    prof = _resolve(cfg.hardware_profile, base, "hardware_profile", path)
    return dataclasses.replace(cfg, workload=wl, hardware_profile=prof)


def _check_consistency(cfg: Config, path: str) -> None:
    ms = cfg.model_shape
    if ms is None and cfg.model not in MODELS:
        raise KvsimError(f"{path}: model: expected one of {', '.join(MODELS)} (or a model_shape), got {cfg.model!r}")
    if ms is not None and ms.hidden % ms.heads:
        raise KvsimError(f"{path}: model_shape.heads: expected a divisor of hidden ({ms.hidden}), got {ms.heads}")
    if ms is not None and ms.heads % ms.kv_heads:
        raise KvsimError(f"{path}: model_shape.kv_heads: expected a divisor of heads ({ms.heads}), got {ms.kv_heads}")
    shape = cfg.shape()
    ra = cfg.policy.round_attention
    if ra.enabled and ra.watershed_layer >= shape.layers:
        raise KvsimError(f"{path}: policy.round_attention.watershed_layer: expected < {shape.layers} "
                         f"(layers of {cfg.model}), got {ra.watershed_layer}")
    if ra.enabled and cfg.policy.kind != "attentionstore":
        raise KvsimError(f"{path}: policy.round_attention.enabled: needs policy.kind attentionstore, got {cfg.policy.kind}")
    if cfg.policy.read_buffer_layers > shape.layers:
        raise KvsimError(f"{path}: policy.read_buffer_layers: expected <= {shape.layers} (layers of {cfg.model})")


def config_to_dict(cfg: Config) -> dict:
    """Fully resolved config as plain types: what a sweep hashes to key its points."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    if d["model_shape"] is None:
        del d["model_shape"]  # a named model keys exactly as before model_shape existed
    return d
