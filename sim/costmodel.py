"""What each step costs: the single source of truth shared by the simulator and gpu/.

Two back ends implement one interface, `CostModel` (prefill time of one request, one decode step of
a batch, bandwidth of each link at a transfer size, the serving loop's host terms):
  * `RooflineCost`: FLOPs and bytes over datasheet peaks times efficiency factors;
  * `ProfileCost`: tables measured on a real GPU by `kvsim gpu calibrate`, in the schema below,
    interpolated bilinearly (linear extrapolation past the grid; link tables in log(chunk size));
  * `ExpertParallelCost`: the roofline of a MoE replica served with data-parallel attention and expert
    parallelism (`gpu.expert_parallel`) instead of tensor parallelism (datasheet only: nothing measured).
The formulas over those quantities live once in `CostModel`: a history load per layer
(`history_load_layer_s`) and a prefill iteration as named parts (`prefill_iteration`), whose
layer-wise preload pipeline (CachedAttention §3.2) is the closed form `preload_pipeline_s`.
`build_cost_model(cfg)` picks the back end and resolves the SSD contention mode and the HBM left
for KV once.

Hardware profile schema `kvsim-hardware-profile/1` (YAML):
  schema, device, measured_at, command            provenance
  gpu: {hbm_bytes, peak_bf16_flops, hbm_bw_gbps}
  links: {h2d_pinned|d2h_pinned|h2d_pageable|d2h_pageable: {chunk_bytes: [...], gbps: [...]}}
  ssd: {read: {chunk_bytes, gbps}, write: {chunk_bytes, gbps}}
  models: {<model name>: {prefill_layer_ms: {new_tokens, history_tokens, ms[new][hist]},
                          decode_layer_ms: {batch, context_tokens, ms[batch][ctx]},
                          head_ms: {prefill: {new_tokens, ms}, decode: {batch, ms}}}}
  Optional per model: preload_layer_overhead_ms (fixed cost per layer of the gated preload path, on
    the load side); host_turn_ms (the serving loop's host time per prefill outside its GPU work: turn
    set-up before the first kernel, the wake-up after the first token); preload_gate_layer_ms (per
    layer, on the compute side: a layer gated on its load's event waits on another stream);
    host_next_turn_ms (the serving loop's host time after a reply whose session has a next turn, before
    it can start another turn: the TP executor's ranks agree on the reply's end, from which that turn
    is scheduled, and the last rank to leave that host-group broadcast starts the next prefill late);
    decode_after_prefill_ms: {prefill_ms: [...], ms: [...], steps: K} (what the first K decode steps
    after a prefill take beyond the decode tables in all, over that prefill's time: replies of K + 1
    tokens served back to back by the executor, `gpu.calibrate.decode_after_prefill`; the GPU's clock is
    still down after a long compute-bound prefill. Charged ms / K a step to the first K decode steps
    after a prefill, none after them).
  Optional: ssd.contention: how the SSD's reads and writes slow each other, one of CONTENTION (the
    model `gpu.calibrate.ssd_contention_fit` found nearest the samples of
    `gpu.bench.ssd_read_under_write`; sim/tiers.py); absent: not measured.
  Optional: tp: the tensor-parallel degree the tables were measured at (default 1). At tp > 1 the layer
    tables are one rank's times with the layer's two all-reduces included, and the link tables are one
    GPU's rate while all tp GPUs copy their own KV-head shard at once; a config uses such a profile at
    gpu.count == tp only (the tables describe that machine, not a per-GPU quantity to scale).
  Optional: prefill_padding: {new_tokens: [buckets], context_multiple: M}: the executor runs prefill as
    CUDA graphs of fixed shapes, so a request of n new tokens after h cached ones runs as the padded
    shape `padded_prefill(n, h)` (n up to the next bucket; keys up to a multiple of M); the tables are
    measured at padded shapes and looked up there.
  Optional per model: iteration: {decode_ms: {batch, context_tokens, ms[batch][ctx]},
                                  chunk_ms: {new_tokens, history_tokens, ms[new][hist]}, shared_ms}:
    whole steps of a batched (chunked-prefill) executor, as its serving loop waits for them
    (`gpu.batched`, reduced by `gpu.calibrate.iteration_from_raw`): a pure-decode step of `batch`
    sequences holding `context_tokens` tokens each, and a step running one prefill chunk of
    `new_tokens` after `history_tokens` cached ones alone. A step running several parts (chunks and a
    decode batch) pays each part's whole-step time less `shared_ms` per extra part (the per-step cost
    the parts share: launch-bound layers, the step's host work), and never less than its largest part.
    Absent: steps compose the per-layer tables (`CostModel.mixed_layer_s`).
    Optional in it: padding: {batch: [...], chunk_tokens: [...], keys: [...], chunk_slots}: the static
    shapes (CUDA graphs) the executor runs a step at (`StepPadding`: batch, chunk tokens and gathered keys
    each padded to the next bucket); steps_ms: {batch: [...], chunk_tokens: [...], keys: [...], ms: [...]}
    (one entry per measured shape, 0 for no decodes / no chunk): a step whose shape was measured costs
    that time (linear in the keys between shapes measured at the same batch and chunk tokens), any other
    the composition above. host_step_ms: {requests: [...], ms: [...]}: the serving loop's host time per
    step around it (scheduling, bookkeeping), over the step's scheduled requests, added to every step.
  Optional: decode_padding: {context_multiple: M}: the executor decodes with CUDA graphs that attend
    over a whole bucket of keys (a multiple of M, the tail masked), so a step at context c costs the
    table's time at c rounded up to a multiple of M (per sequence); absent: at c itself.
"""
from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

from sim.collectives import (ALLREDUCES_PER_LAYER, ALLTOALLS_PER_MOE_LAYER, AllReduceCost, LinkAllToAll,
                             RingAllReduce, allreduce_bytes_per_layer, alltoall_bytes_per_gpu, load_allreduce_table)
from sim.efficiency import (GEMMS_PER_LAYER, H100 as H100_EFFICIENCY, ROUTED_GEMMS, RooflineEfficiency,
                            gemm_act_bytes_per_token)
from sim.errors import KvsimError, read_yaml
from sim.models import ModelShape
from sim.units import GB, MS, US

SCHEMA = "kvsim-hardware-profile/1"
# How an SSD's reads and writes slow each other (sim/tiers.py): not at all, an even split of the
# bandwidth while both are busy, or requests interleaved (each waits for half the other's request).
CONTENTION = ("none", "even_split", "interleaved")


def preload_pipeline_s(layers: int, load_layer_s: float, compute_layer_s: float, buffer_layers: int,
                       layerwise: bool) -> float:
    """Time from the start of a prefill to its last layer's end when history KV is loaded from the host.

    Layer-wise pre-loading (CachedAttention §3.2): the load of layer i+1 overlaps the compute of
    layer i; a read buffer of N layers lets loads run N layers ahead. For uniform layers the
    max-plus recursion (load i starts when load i-1 ended and layer i-N's compute freed its slot;
    compute i starts when load i and compute i-1 ended) has the closed form below: with N >= 2 the
    slower stage sets the pace after a one-layer fill; with N = 1 a slot is freed only when its
    compute ends, so nothing overlaps. Without layer-wise preload everything is loaded first.
    """
    if load_layer_s <= 0.0:
        return layers * compute_layer_s
    if not layerwise or buffer_layers < 2:
        return layers * (load_layer_s + compute_layer_s)
    return load_layer_s + compute_layer_s + (layers - 1) * max(load_layer_s, compute_layer_s)


@dataclass(frozen=True)
class PrefillPadding:
    """Fixed prefill shapes of a graph-captured executor (the profile's `prefill_padding`)."""
    new_tokens: tuple          # ascending bucket sizes for the new tokens
    context_multiple: int      # keys attended to (history + padded new tokens) round up to this

    def new_bucket(self, n: int) -> int:
        i = bisect.bisect_left(self.new_tokens, n)
        if i == len(self.new_tokens):
            raise KvsimError(f"prefill of {n} new tokens: above the largest padded shape {self.new_tokens[-1]}")
        return int(self.new_tokens[i])

    def padded(self, new: int, hist: int) -> tuple[int, int]:
        """(padded new tokens, history the padded shape attends over beyond them).

        With no history the shape is plain causal over the padded tokens; with history the keys run
        to the next multiple of `context_multiple` (masked past the real ones), so their count, not
        the real history, sets the attention work.
        """
        nb = self.new_bucket(max(int(new), 1))
        if hist <= 0:
            return nb, 0
        m = self.context_multiple
        return nb, -(-(int(hist) + nb) // m) * m - nb

    def max_pad(self, up_to: int) -> int:
        """Most padding any prefill of <= up_to new tokens gets (sizes the caches' slack)."""
        prev, worst = 0, 0
        for b in self.new_tokens:
            if prev >= up_to:
                break
            worst = max(worst, b - (prev + 1))
            prev = b
        return worst + self.context_multiple


def bucket_at_least(buckets, n: float) -> Optional[int]:
    """The smallest bucket >= n, None past the largest."""
    i = bisect.bisect_left(buckets, n)
    return int(buckets[i]) if i < len(buckets) else None


def sqrt2_ladder(limit: int, smallest: int = 64, multiple: int = 16) -> tuple:
    """Sizes growing by sqrt(2), each rounded up to `multiple`, from `smallest` to the first at or past
    `limit`: a size padded to the next one grows by at most ~41%."""
    out, k = [], 0
    while True:
        t = int(math.ceil(smallest * 2 ** (k / 2) / multiple) * multiple)
        if not out or t > out[-1]:
            out.append(t)
        if t >= limit:
            return tuple(out)
        k += 1


@dataclass(frozen=True)
class StepPadding:
    """The static shapes a graph-captured batched executor runs a step at (the profile's
    `models.<m>.iteration.padding`; `gpu.batched_decode` runs them, so both sides use this rule).

    A step of `batch` decoding sequences holding `context_tokens` tokens in all and prefill chunks
    `[(new, cached), ...]` runs as the key (Bb, Nb, Kb):
    * Bb: the batch padded to the next of `batch` (0 without decodes); padded rows decode one token
      over one key (the scratch slot);
    * Nb: the chunks' new tokens together padded to the next of `chunk_tokens` (0 without chunks);
      the padding tokens form one more sequence attending over its own keys (the scratch slot);
    * Kb: every key the step gathers (the decodes' contexts, one per padded row, each chunk's cached
      and new tokens, the padding sequence's) padded to the next of `keys`.
    At most `chunk_slots` chunks fit one shape. None: the step has no static shape (the executor
    runs it eagerly)."""
    batch: tuple
    chunk_tokens: tuple
    keys: tuple
    chunk_slots: int

    def key(self, chunks, batch: int, context_tokens: float) -> Optional[tuple]:
        if len(chunks) > self.chunk_slots or (not chunks and not batch):
            return None
        Bb = bucket_at_least(self.batch, batch) if batch else 0
        new = sum(n for n, _ in chunks)
        Nb = bucket_at_least(self.chunk_tokens, new) if chunks else 0
        if Bb is None or Nb is None:
            return None
        keys = context_tokens + (Bb - batch) + (sum(h for _, h in chunks) + Nb if chunks else 0)
        Kb = bucket_at_least(self.keys, keys)
        return None if Kb is None else (Bb, Nb, Kb)

    def decode_last_context(self, batch: int, context_tokens: float) -> float:
        """The largest context of `batch` decoding sequences that keeps the pure-decode step at the key
        of `context_tokens` (a padded step's time is constant up to there); inf past the ladders."""
        k = self.key((), batch, context_tokens)
        if k is None:
            return math.inf
        return k[2] - (k[0] - batch)


# --- interpolation (the profile back end) -------------------------------------------------------

def _seg(xs: Sequence[float], x: float) -> int:
    """Index i of the segment [xs[i], xs[i+1]] used for x (end segments extrapolate)."""
    i = bisect.bisect_right(xs, x) - 1
    return min(max(i, 0), len(xs) - 2)


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = _seg(xs, x)
    x0, x1 = xs[i], xs[i + 1]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0)


def interp2(xs: Sequence[float], ys: Sequence[float], z: Sequence[Sequence[float]], x: float, y: float) -> float:
    """Bilinear on the grid z[x][y]; linear extrapolation outside (clamped at >= 0 by callers)."""
    if len(xs) == 1:
        return interp1(ys, z[0], y)
    i = _seg(xs, x)
    a = interp1(ys, z[i], y)
    b = interp1(ys, z[i + 1], y)
    return a + (b - a) * (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class Table1D:
    xs: tuple
    ys: tuple
    log_x: bool = False

    def __call__(self, x: float) -> float:
        if self.log_x:
            return interp1(self.xs, self.ys, math.log(max(x, 1.0)))
        return interp1(self.xs, self.ys, x)

    def time(self, x: float) -> float:
        """A time looked up: an extrapolation that falls to 0 or below (noisy, non-monotone samples)
        takes the fastest measured time instead, since nothing runs in no time."""
        v = self(x)
        return v if v > 0.0 else _fastest(self.ys)


@dataclass(frozen=True)
class Table2D:
    xs: tuple
    ys: tuple
    z: tuple

    def __call__(self, x: float, y: float) -> float:
        return interp2(self.xs, self.ys, self.z, x, y)

    def time(self, x: float, y: float) -> float:
        """As `Table1D.time`."""
        v = interp2(self.xs, self.ys, self.z, x, y)
        return v if v > 0.0 else _fastest(v for row in self.z for v in row)


def _fastest(values) -> float:
    pos = [v for v in values if v > 0.0]
    return min(pos) if pos else 0.0


@dataclass(frozen=True)
class ModelProfile:
    prefill_layer_ms: Table2D
    decode_layer_ms: Table2D
    head_prefill_ms: Table1D
    head_decode_ms: Table1D
    preload_layer_overhead_ms: float = 0.0
    host_turn_ms: float = 0.0
    preload_gate_layer_ms: float = 0.0
    host_next_turn_ms: float = 0.0
    iteration: Optional["IterationProfile"] = None
    decode_after_prefill_ms: Optional[Table1D] = None
    decode_after_prefill_steps: int = 1


@dataclass(frozen=True)
class IterationProfile:
    """A batched executor's measured whole steps (schema above: `models.<name>.iteration`)."""
    decode_ms: Table2D      # pure-decode step over (batch, context tokens per sequence)
    chunk_ms: Table2D       # one prefill chunk's step over (new tokens, cached tokens)
    shared_ms: float        # per-step cost shared by the parts of a step, paid once
    padding: Optional[StepPadding] = None
    # static-shape steps measured at their key: (Bb, Nb) -> ((Kb, ...), (ms, ...)), Kb ascending
    keyed: Optional[dict] = None
    # the serving loop's host time per step outside the step (schedule, update) over scheduled requests
    host_step_ms: Optional[Table1D] = None

    def step_ms(self, chunks, batch: int, context_tokens: float) -> float:
        """A step's time as the serving loop waits for it: the step (`run_ms`) and the loop's host time
        around it (`host_step_ms`, at the step's scheduled requests)."""
        t = self.run_ms(chunks, batch, context_tokens)
        if self.host_step_ms is not None and t > 0.0:
            t += max(self.host_step_ms(len(chunks) + batch), 0.0)
        return t

    def run_ms(self, chunks, batch: int, context_tokens: float) -> float:
        """A step's time at its static shape (`padding`). A shape with chunks exists only where measured
        (the executor captures those): a step of an unmeasured key count runs at the next measured
        one of its (Bb, Nb), which holds it with more filler. A pure-decode shape exists for every
        key count: one not measured is linear in the keys between those measured at its batch (the
        first's time below them, the last segment's slope beyond). Otherwise (no measured shape to go
        by, or past the ladders: the executor runs it eagerly) the whole-step tables compose."""
        if self.keyed and self.padding is not None:
            k = self.padding.key(chunks, batch, context_tokens)
            if k is not None:
                row = self.keyed.get(k[:2])
                if row is not None and k[1]:
                    kbs, ms = row
                    i = bisect.bisect_left(kbs, k[2])
                    if i < len(kbs):
                        return ms[i]
                elif row is not None:
                    kbs, ms = row
                    if k[2] <= kbs[0]:
                        return ms[0]
                    if k[2] >= kbs[-1]:   # beyond: the last segment's slope, never below its end
                        return max(interp1(kbs, ms, k[2]), ms[-1])
                    return interp1(kbs, ms, k[2])
        return self.composed_ms(chunks, batch, context_tokens)

    def composed_ms(self, chunks, batch: int, context_tokens: float) -> float:
        parts = [max(self.chunk_ms(n, h), 0.0) for n, h in chunks]
        if batch:
            parts.append(max(self.decode_ms(batch, context_tokens / batch), 0.0))
        if not parts:
            return 0.0
        return max(sum(parts) - self.shared_ms * (len(parts) - 1), max(parts))


@dataclass(frozen=True)
class HardwareProfile:
    device: str
    measured_at: str
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bw_gbps: float
    links: dict  # name -> Table1D over log(chunk bytes), GB/s
    ssd_read: Table1D
    ssd_write: Table1D
    models: dict  # model name -> ModelProfile
    path: str = ""
    prefill_padding: Optional[PrefillPadding] = None
    ssd_contention: Optional[str] = None
    tp: int = 1                   # tensor-parallel degree the tables were measured at
    decode_context_multiple: Optional[int] = None   # decode_padding.context_multiple: keys a step attends over


def _num_list(v, key, path, ascending=False, positive=False) -> tuple:
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise KvsimError(f"{path}: {key}: expected a non-empty list of numbers")
    if ascending and any(b <= a for a, b in zip(v, v[1:])):
        raise KvsimError(f"{path}: {key}: expected strictly ascending values")
    if positive and any(x <= 0 for x in v):
        raise KvsimError(f"{path}: {key}: expected values > 0")
    if any(x < 0 or not math.isfinite(x) for x in v):
        raise KvsimError(f"{path}: {key}: expected finite values >= 0")
    return tuple(float(x) for x in v)


def _get(d, key, path, prefix):
    full = f"{prefix}.{key}" if prefix else key
    if not isinstance(d, dict) or key not in d:
        raise KvsimError(f"{path}: {full}: missing; see the schema in sim/costmodel.py")
    return d[key], full


def _link_table(d, path, key) -> Table1D:
    chunks, kc = _get(d, "chunk_bytes", path, key)
    gbps, kg = _get(d, "gbps", path, key)
    xs = _num_list(chunks, kc, path, ascending=True, positive=True)
    ys = _num_list(gbps, kg, path, positive=True)
    if len(xs) != len(ys):
        raise KvsimError(f"{path}: {kg}: expected {len(xs)} values (one per chunk size)")
    return Table1D(tuple(math.log(x) for x in xs), ys, log_x=True)


def _table2(d, path, key, xname, yname) -> Table2D:
    xv, kx = _get(d, xname, path, key)
    yv, ky = _get(d, yname, path, key)
    zv, kz = _get(d, "ms", path, key)
    xs = _num_list(xv, kx, path, ascending=True)
    ys = _num_list(yv, ky, path, ascending=True)
    if not isinstance(zv, list) or len(zv) != len(xs):
        raise KvsimError(f"{path}: {kz}: expected {len(xs)} rows (one per {xname})")
    rows = tuple(_num_list(r, f"{kz}[{i}]", path) for i, r in enumerate(zv))
    if any(len(r) != len(ys) for r in rows):
        raise KvsimError(f"{path}: {kz}: expected {len(ys)} columns (one per {yname}) in every row")
    return Table2D(xs, ys, rows)


def _table1(d, path, key, xname) -> Table1D:
    xv, kx = _get(d, xname, path, key)
    yv, ky = _get(d, "ms", path, key)
    xs = _num_list(xv, kx, path, ascending=True)
    ys = _num_list(yv, ky, path)
    if len(xs) != len(ys):
        raise KvsimError(f"{path}: {ky}: expected {len(xs)} values")
    return Table1D(xs, ys)


def _whole_list(v, key, path, ascending=False) -> tuple:
    xs = _num_list(v, key, path, ascending=ascending)
    if any(x != int(x) for x in xs):
        raise KvsimError(f"{path}: {key}: expected whole numbers")
    return tuple(int(x) for x in xs)


def _step_padding(d, path, key) -> StepPadding:
    _known_keys(d, "models.*.iteration.padding", path, key)
    lists = []
    for name in ("batch", "chunk_tokens", "keys"):
        v, k = _get(d, name, path, key)
        lists.append(_whole_list(v, k, path, ascending=True))
        if lists[-1][0] < 1:
            raise KvsimError(f"{path}: {k}: expected sizes >= 1")
    slots, k = _get(d, "chunk_slots", path, key)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise KvsimError(f"{path}: {k}: expected an integer >= 1, got {slots!r}")
    return StepPadding(*lists, slots)


def _steps_keyed(d, path, key, padding: StepPadding) -> dict:
    """`steps_ms`: parallel lists, one entry per measured static shape -> (Bb, Nb) -> (Kb..., ms...)."""
    _known_keys(d, "models.*.iteration.steps_ms", path, key)
    cols = {}
    for name in ("batch", "chunk_tokens", "keys"):
        v, k = _get(d, name, path, key)
        cols[name] = _whole_list(v, k, path)
    ms_raw, kms = _get(d, "ms", path, key)
    ms = _num_list(ms_raw, kms, path, positive=True)
    if any(len(c) != len(ms) for c in cols.values()):
        raise KvsimError(f"{path}: {key}: expected batch, chunk_tokens, keys and ms of one length ({len(ms)})")
    rows: dict = {}
    for b, n, kb, t in zip(cols["batch"], cols["chunk_tokens"], cols["keys"], ms):
        if (b and b not in padding.batch) or (n and n not in padding.chunk_tokens) or kb not in padding.keys:
            raise KvsimError(f"{path}: {key}: shape ({b}, {n}, {kb}) is not one of the padding's buckets")
        rows.setdefault((b, n), {})[kb] = t
    return {bn: (tuple(sorted(r)), tuple(r[kb] for kb in sorted(r))) for bn, r in rows.items()}


def _iteration(d, path, key) -> IterationProfile:
    dc, kdc = _get(d, "decode_ms", path, key)
    ch, kch = _get(d, "chunk_ms", path, key)
    shared, ks = _get(d, "shared_ms", path, key)
    if not isinstance(shared, (int, float)) or isinstance(shared, bool) or not shared >= 0 or not math.isfinite(shared):
        raise KvsimError(f"{path}: {ks}: expected a number >= 0, got {shared!r}")
    padding = _step_padding(d["padding"], path, f"{key}.padding") if "padding" in d else None
    host = _table1(d["host_step_ms"], path, f"{key}.host_step_ms", "requests") if "host_step_ms" in d else None
    keyed = None
    if "steps_ms" in d:
        if padding is None:
            raise KvsimError(f"{path}: {key}.padding: missing; steps_ms are measured at its static shapes")
        keyed = _steps_keyed(d["steps_ms"], path, f"{key}.steps_ms", padding)
    return IterationProfile(_table2(dc, path, kdc, "batch", "context_tokens"),
                            _table2(ch, path, kch, "new_tokens", "history_tokens"), float(shared), padding, keyed,
                            host)


# Keys a profile may hold, per section: a misspelt optional key is an error, not a silent 0.
_KEYS = {"": ("schema", "device", "measured_at", "command", "tp", "gpu", "links", "ssd", "models", "prefill_padding",
             "decode_padding"),
         "gpu": ("hbm_bytes", "peak_bf16_flops", "hbm_bw_gbps"),
         "links": ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable"),
         "ssd": ("read", "write", "method", "read_pattern", "write_pattern", "contention"),
         "models.*": ("prefill_layer_ms", "decode_layer_ms", "head_ms", "preload_layer_overhead_ms", "host_turn_ms",
                      "preload_gate_layer_ms", "host_next_turn_ms", "iteration", "decode_after_prefill_ms"),
         "models.*.iteration": ("decode_ms", "chunk_ms", "shared_ms", "padding", "steps_ms", "host_step_ms"),
         "models.*.iteration.padding": ("batch", "chunk_tokens", "keys", "chunk_slots"),
         "models.*.iteration.steps_ms": ("batch", "chunk_tokens", "keys", "ms")}


def _known_keys(d, section: str, path: str, prefix: str):
    if isinstance(d, dict):
        unknown = sorted(set(d) - set(_KEYS[section]))
        if unknown:
            key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
            raise KvsimError(f"{path}: {key}: unknown key; expected one of {', '.join(_KEYS[section])}")


def parse_profile(raw: dict, path: str = "<profile>") -> HardwareProfile:
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise KvsimError(f"{path}: schema: expected {SCHEMA!r}, got {raw.get('schema') if isinstance(raw, dict) else raw!r}")
    _known_keys(raw, "", path, "")
    for section in ("gpu", "links", "ssd"):
        _known_keys(raw.get(section), section, path, section)
    if isinstance(raw.get("models"), dict):
        for name, m in raw["models"].items():
            _known_keys(m, "models.*", path, f"models.{name}")
            if isinstance(m, dict):
                _known_keys(m.get("iteration"), "models.*.iteration", path, f"models.{name}.iteration")
    gpu, _ = _get(raw, "gpu", path, "")
    vals = {}
    for k in ("hbm_bytes", "peak_bf16_flops", "hbm_bw_gbps"):
        v, full = _get(gpu, k, path, "gpu")
        if not isinstance(v, (int, float)) or v <= 0:
            raise KvsimError(f"{path}: {full}: expected a number > 0, got {v!r}")
        vals[k] = float(v)
    links_raw, _ = _get(raw, "links", path, "")
    links = {}
    for name in ("h2d_pinned", "d2h_pinned"):
        t, full = _get(links_raw, name, path, "links")
        links[name] = _link_table(t, path, full)
    for name in ("h2d_pageable", "d2h_pageable"):
        if isinstance(links_raw, dict) and name in links_raw:
            links[name] = _link_table(links_raw[name], path, f"links.{name}")
    ssd, _ = _get(raw, "ssd", path, "")
    r, kr = _get(ssd, "read", path, "ssd")
    w, kw = _get(ssd, "write", path, "ssd")
    models_raw, _ = _get(raw, "models", path, "")
    if not isinstance(models_raw, dict) or not models_raw:
        raise KvsimError(f"{path}: models: expected a mapping of model name -> tables")
    models = {}
    for mname, m in models_raw.items():
        pre = f"models.{mname}"
        pf, kpf = _get(m, "prefill_layer_ms", path, pre)
        dc, kdc = _get(m, "decode_layer_ms", path, pre)
        head, kh = _get(m, "head_ms", path, pre)
        hp, khp = _get(head, "prefill", path, kh)
        hd, khd = _get(head, "decode", path, kh)
        extra = {}
        for k in ("preload_layer_overhead_ms", "host_turn_ms", "preload_gate_layer_ms", "host_next_turn_ms"):
            v = m.get(k, 0.0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or not math.isfinite(v):
                raise KvsimError(f"{path}: {pre}.{k}: expected a number >= 0, got {v!r}")
            extra[k] = float(v)
        if "iteration" in m:
            extra["iteration"] = _iteration(m["iteration"], path, f"{pre}.iteration")
        if "decode_after_prefill_ms" in m:
            extra["decode_after_prefill_ms"] = _table1(m["decode_after_prefill_ms"], path,
                                                       f"{pre}.decode_after_prefill_ms", "prefill_ms")
            k, kk = _get(m["decode_after_prefill_ms"], "steps", path, f"{pre}.decode_after_prefill_ms")
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise KvsimError(f"{path}: {kk}: expected an integer >= 1 (decode steps), got {k!r}")
            extra["decode_after_prefill_steps"] = k
        models[mname] = ModelProfile(
            _table2(pf, path, kpf, "new_tokens", "history_tokens"),
            _table2(dc, path, kdc, "batch", "context_tokens"),
            _table1(hp, path, khp, "new_tokens"), _table1(hd, path, khd, "batch"), **extra)
    padding = None
    if "prefill_padding" in raw:
        pad = raw["prefill_padding"]
        nb, knb = _get(pad, "new_tokens", path, "prefill_padding")
        mult, km = _get(pad, "context_multiple", path, "prefill_padding")
        buckets = _num_list(nb, knb, path, ascending=True, positive=True)
        if any(b != int(b) for b in buckets):
            raise KvsimError(f"{path}: {knb}: expected whole token counts")
        if not isinstance(mult, int) or isinstance(mult, bool) or mult < 1:
            raise KvsimError(f"{path}: {km}: expected an integer >= 1, got {mult!r}")
        padding = PrefillPadding(tuple(int(b) for b in buckets), mult)
    decode_multiple = None
    if "decode_padding" in raw:
        mult, km = _get(raw["decode_padding"], "context_multiple", path, "decode_padding")
        if not isinstance(mult, int) or isinstance(mult, bool) or mult < 1:
            raise KvsimError(f"{path}: {km}: expected an integer >= 1, got {mult!r}")
        decode_multiple = mult
    shared = ssd.get("contention") if isinstance(ssd, dict) else None
    if shared is not None and shared not in CONTENTION:
        raise KvsimError(f"{path}: ssd.contention: expected one of {', '.join(CONTENTION)}, got {shared!r}")
    tp = raw.get("tp", 1)       # profiles written before TP was measured are single-GPU
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise KvsimError(f"{path}: tp: expected an integer >= 1 (the tensor-parallel degree measured), got {tp!r}")
    return HardwareProfile(str(raw.get("device", "")), str(raw.get("measured_at", "")), vals["hbm_bytes"],
                           vals["peak_bf16_flops"], vals["hbm_bw_gbps"], links, _link_table(r, path, kr),
                           _link_table(w, path, kw), models, path, padding, shared, tp, decode_multiple)


def load_profile(path) -> HardwareProfile:
    return parse_profile(read_yaml(path, "hardware profile"), str(path))


# --- the cost back ends ---------------------------------------------------------------------------

@dataclass(slots=True)  # not frozen: built once per simulated prefill, and freezing costs 3x
class IterationCost:
    """One prefill iteration's wall time as named parts, so a new term is a field (as Vidur's
    `ExecutionTime` names its parts). `layers_s` is the layer-wise preload pipeline (it overlaps
    `load_s` with `compute_s`, so those two are totals for reading, not summands of `total_s`)."""
    layers_s: float    # preload pipeline over per-layer load and compute, per-layer gating included
    compute_s: float   # layers x compute per layer (gating and communication included)
    load_s: float      # layers x load per layer
    head_s: float      # LM head for the first token
    host_s: float      # the serving loop's fixed host time per prefill
    comm_s: float      # layers x tensor-parallel all-reduces per layer (part of compute_s and layers_s:
                       # they run on the compute stream between a layer's kernels)

    @property
    def total_s(self) -> float:
        return self.layers_s + self.head_s + self.host_s


class CostModel(ABC):
    """What each step costs. A back end supplies the measured quantities (the abstract lookups and the
    host terms, required at construction, so a back end cannot silently leave one out); the formulas
    that combine them (history loads, the prefill iteration) live here once.

    Resolved once when built (`build_cost_model`): `ssd_contention` (the config's `ssd.contention`,
    else the back end's measurement, else "none") and `hbm_kv_bytes` (HBM left for KV; None when
    built without a config, as `gpu/` does for timings alone).
    """

    def __init__(self, shape: ModelShape, *, layer_copy_overhead_s: float, layer_gate_s: float,
                 host_turn_s: float, host_next_turn_s: float, measured_contention: Optional[str],
                 ssd_contention: Optional[str] = None, hbm_kv_bytes: Optional[float] = None):
        self.shape = shape
        # a gated preload path's fixed cost per layer copy (issue and DMA set-up), on the load side
        self.layer_copy_overhead_s = layer_copy_overhead_s
        # a layer gated on its load's event waits on another stream: per layer, on the compute side
        self.layer_gate_s = layer_gate_s
        # the serving loop's host time per prefill outside its GPU work
        self.host_turn_s = host_turn_s
        # the serving loop's host time after a reply whose session goes on, before its next turn can
        # start (charged by the one-turn-at-a-time engine's finish, sim.engine.Replica._finish)
        self.host_next_turn_s = host_next_turn_s
        # a measured profile's extra time of the decode steps that follow a prefill (`after_prefill_s`)
        self.decode_after_prefill = None
        self.decode_after_prefill_steps = 1
        mode = ssd_contention or measured_contention or "none"
        if mode not in CONTENTION:
            raise KvsimError(f"ssd.contention: expected one of {', '.join(CONTENTION)}, got {mode!r}")
        self.ssd_contention = mode
        # batch -> the decode step's one kink, for back ends whose step has at most one, independent of
        # the context it starts from (a dense roofline): decode_span then looks it up instead of a call
        self._kinks_by_batch = None
        self.hbm_kv_bytes = hbm_kv_bytes
        # a back end that prices iterations its own way: `iteration_s` asks it for the parts
        self._own_iteration = (type(self).iteration is not CostModel.iteration
                               or type(self).prefill_iteration is not CostModel.prefill_iteration)

    # --- measured (or datasheet) quantities: every back end answers each one
    @abstractmethod
    def prefill_layer_s(self, new: float, hist: float) -> float: ...

    @abstractmethod
    def prefill_head_s(self, new: float) -> float: ...

    @abstractmethod
    def decode_step_s(self, batch: int, context_tokens: float) -> float: ...

    @abstractmethod
    def decode_head_s(self, batch: int) -> float:
        """The LM head over `batch` sequences' last positions (part of `decode_step_s`)."""

    @abstractmethod
    def h2d_bw(self, chunk_bytes: float) -> float: ...

    @abstractmethod
    def d2h_bw(self, chunk_bytes: float) -> float: ...

    @abstractmethod
    def ssd_read_bw(self, chunk_bytes: float) -> float: ...

    @abstractmethod
    def ssd_write_bw(self, chunk_bytes: float) -> float: ...

    def comm_layer_s(self, tokens: float) -> float:
        """Tensor-parallel communication of one layer over `tokens` tokens (none for a back end without it)."""
        return 0.0

    def prefill_compute_layer_s(self, new: float, hist: float) -> float:
        """`prefill_layer_s` without the layer's communication: a batched iteration pays that once over
        all its tokens (`prefill_iteration`'s comm_layer_s), not once per request."""
        return self.prefill_layer_s(new, hist)

    def decode_next_kink(self, batch: int, context_tokens: float) -> float:
        """The smallest total context > `context_tokens` at which `decode_step_s(batch, .)` changes slope
        (inf if it is linear from here on). `decode_span` sums exactly between two kinks."""
        return math.inf

    # --- formulas over them, shared by the back ends
    def history_load_layer_s(self, dram_chunk_bytes: float, ssd_chunk_bytes: float = 0.0,
                             ssd_slowdown: float = 1.0, overhead_s: Optional[float] = None) -> float:
        """Per-layer time to bring one request's history into HBM for layer-wise preload.

        The DRAM part crosses H2D; the SSD part is staged SSD -> DRAM -> HBM layer by layer, so the
        slower stage paces it (`ssd_slowdown` stretches the SSD stage while writes share the device,
        `sim.tiers.SharedDeviceLink`). The fixed per-layer copy overhead (`overhead_s`, default the
        back end's) is charged once if anything loads; nothing to load costs 0.
        """
        if overhead_s is None:
            overhead_s = self.layer_copy_overhead_s
        t = dram_chunk_bytes / self.h2d_bw(dram_chunk_bytes) if dram_chunk_bytes else 0.0
        if ssd_chunk_bytes:
            bw = min(self.ssd_read_bw(ssd_chunk_bytes) / ssd_slowdown, self.h2d_bw(ssd_chunk_bytes))
            return t + (ssd_chunk_bytes / bw + overhead_s)
        if t:
            return t + overhead_s
        return 0.0

    def prefill_iteration(self, load_layer_s: float, compute_layer_s: float, head_s: float,
                          buffer_layers: int, layerwise: bool, comm_layer_s: float = 0.0) -> IterationCost:
        """One prefill iteration, its first token included: the preload pipeline over per-layer load
        and compute times (a gated layer pays the cross-stream wait on its compute side), the heads,
        and the serving loop's fixed host time. `comm_layer_s`, the iteration's all-reduces per layer
        (once over all its tokens: Megatron's two per layer), runs on the compute stream, so it joins
        each layer's compute inside the pipeline."""
        if load_layer_s > 0.0 and layerwise:
            compute_layer_s += self.layer_gate_s
        compute_layer_s += comm_layer_s
        L = self.shape.layers
        return IterationCost(preload_pipeline_s(L, load_layer_s, compute_layer_s, buffer_layers, layerwise),
                             L * compute_layer_s, L * load_layer_s, head_s, self.host_turn_s, L * comm_layer_s)


    def mixed_layer_s(self, chunks, batch: int, context_tokens: float) -> float:
        """One layer of an iteration that runs prefill chunks `[(new tokens, cached tokens), ...]` together
        with `batch` decoding sequences holding `context_tokens` tokens in all (vLLM V1 and Sarathi batch
        them into one forward pass). A back end without a mixed measurement composes its two tables:
        the prefill table at all the iteration's new tokens (the decodes' included: the linear layers run
        once over every token), at the cached length that gives the chunks' attention work, plus the
        decodes' attention over their context (their decode-table time beyond the table's shortest
        context). That composition is an extrapolation until mixed iterations are measured."""
        new = sum(n for n, _ in chunks)
        tokens = new + batch
        if tokens <= 0:
            return 0.0
        # cached length h of one chunk of `new` tokens doing the chunks' attention work:
        # new * (h + (new + 1) / 2) = sum n (h_i + (n + 1) / 2)
        work = sum(n * (h + (n + 1) / 2.0) for n, h in chunks)
        hist = max(work / new - (new + 1) / 2.0, 0.0) if new else 0.0
        t = self.prefill_layer_s(tokens, hist)
        if batch:
            t += max(self.decode_attention_layer_s(batch, context_tokens), 0.0)
        return t

    def decode_attention_layer_s(self, batch: int, context_tokens: float) -> float:
        """Per layer, what attending over `context_tokens` adds to a decode step of `batch` sequences."""
        return (self.decode_step_s(batch, context_tokens) - self.decode_step_s(batch, 0.0)) / self.shape.layers

    def iteration(self, chunks, batch: int, context_tokens: float, load_layer_s: float = 0.0,
                  buffer_layers: int = 2, layerwise: bool = True) -> IterationCost:
        """One iteration of a chunked-prefill engine: prefill chunks and decodes in one batch, the
        history loads of the chunks' reused KV overlapped layer by layer (CachedAttention §3.2), the LM
        head for every scheduled sequence (its last position), and the serving loop's host time."""
        layer = self.mixed_layer_s(chunks, batch, context_tokens)
        heads = len(chunks) + batch
        head = self.decode_head_s(heads) if heads else 0.0
        return self.prefill_iteration(load_layer_s, layer, head, buffer_layers, layerwise)

    def iteration_s(self, chunks, batch: int, context_tokens: float, load_layer_s: float = 0.0,
                    buffer_layers: int = 2, layerwise: bool = True) -> float:
        """`iteration(...).total_s` without building its parts: the same operations in the same order
        (the chunked engine prices every step with prefill work here)."""
        if self._own_iteration:
            return self.iteration(chunks, batch, context_tokens, load_layer_s, buffer_layers, layerwise).total_s
        layer = self.mixed_layer_s(chunks, batch, context_tokens)
        heads = len(chunks) + batch
        head = self.decode_head_s(heads) if heads else 0.0
        # `prefill_iteration` without communication, and `IterationCost.total_s`
        L = self.shape.layers
        # `preload_pipeline_s`, inline (once per step with prefill work)
        if load_layer_s <= 0.0:
            t = L * layer
        else:
            if layerwise:
                layer += self.layer_gate_s
            if not layerwise or buffer_layers < 2:
                t = L * (load_layer_s + layer)
            else:
                t = load_layer_s + layer + (L - 1) * (load_layer_s if load_layer_s >= layer else layer)
        return t + head + self.host_turn_s

    def after_prefill_s(self, prefill_s: float) -> float:
        """The measured extra time of each of the first `decode_after_prefill_steps` decode steps after a
        prefill of `prefill_s` (profile key `decode_after_prefill_ms`; 0 without it): held between the
        measured prefills' times, not extrapolated past them (a longer prefill is charged the longest
        one's), and never below 0."""
        t = self.decode_after_prefill
        if t is None:
            return 0.0
        ms = prefill_s / MS
        ms = min(max(ms, t.xs[0]), t.xs[-1])
        return max(t(ms), 0.0) * MS / self.decode_after_prefill_steps

    def decode_span(self, batch: int, context_tokens: float, kmax: int, budget_s: float = math.inf) -> tuple:
        """(seconds, k): the next k decode iterations of `batch` sequences holding `context_tokens` tokens
        in all (each iteration adds one token per sequence), where k is `kmax`, or the fewest iterations
        whose summed time reaches `budget_s` (an arrival that can join at the end of an iteration).

        The step time is piecewise linear in the context (a roofline's compute/memory kink, a measured
        table's grid columns): between two kinks the iterations' times form an arithmetic series, so a
        span costs one evaluation per end of each linear piece, not one per iteration. This is the
        simulator's hottest call: one piece (the common case) takes two step evaluations.
        """
        step = self.decode_step_s
        kinks = self._kinks_by_batch
        if kinks is not None:  # a back end whose kinks do not move with the context
            fixed_kink = kinks.get(batch)
            if fixed_kink is None:
                fixed_kink = kinks[batch] = self.decode_next_kink(batch, -math.inf)
        done, total = 0, 0.0
        while True:
            start = context_tokens + batch * done
            n = kmax - done
            if kinks is not None:
                kink = fixed_kink if fixed_kink > start else math.inf
            else:
                kink = self.decode_next_kink(batch, start)
            if kink < start + batch * (n - 1):
                n = int((kink - start) // batch) + 1  # iterations whose context is <= the kink
            a = step(batch, start)
            # t_j = a + d j inside the piece
            d = (step(batch, start + batch * (n - 1)) - a) / (n - 1) if n > 1 else 0.0
            piece = n * a + d * n * (n - 1) * 0.5
            cut = budget_s - total if done else budget_s
            if cut < piece:
                piece, k = _cut_piece(a, d, n, cut)
                return (total + piece if done else piece), done + k
            total = total + piece if done else piece
            done += n
            if done >= kmax:
                return total, kmax


def _cut_piece(a: float, d: float, n: int, cut: float) -> tuple:
    """(seconds, k) of the fewest of n iterations lasting a + d j whose summed time reaches `cut`
    (`CostModel.decode_span`)."""
    if cut < 0.0:
        cut = 0.0
    # fewest iterations whose summed time reaches the cut: k a + d k(k-1)/2 >= cut
    if d > 1e-15:
        b = a - d * 0.5
        k = int(math.ceil((math.sqrt(b * b + 2.0 * d * cut) - b) / d))
    else:
        k = int(math.ceil(cut / a)) if a > 0 else 1
    if k < 1:
        k = 1
    elif k > n:
        k = n
    return k * a + d * k * (k - 1) * 0.5, k


def kv_shards(shape: ModelShape, gpus: int) -> int:
    """GPUs the KV cache is split over under tensor parallelism: by KV heads, as vLLM shards the KV
    projections; with fewer KV heads than GPUs each head is replicated on gpus / kv_heads of them, and
    MLA's one latent per token is replicated on every GPU."""
    if shape.attention == "mla":
        return 1
    return min(shape.kv_heads, gpus)


def sliding_pairs(new: float, hist: float, window: int) -> float:
    """(query, key) pairs of `new` queries after `hist` cached tokens when each attends at most the
    last `window` positions (itself included): the sum of min(p, window) for p = hist+1 .. hist+new."""
    a, b = hist + 1.0, hist + new
    if b <= window:
        return (a + b) * new / 2.0
    if a > window:
        return new * window
    return (a + window) * (window - a + 1.0) / 2.0 + (b - window) * window


class RooflineCost(CostModel):
    """Time = max(FLOPs / (peak x MFU), bytes / (bandwidth x MBU)) per layer, tensor-parallel over GPUs.
    No host terms: a datasheet has none.

    FLOPs come from the parameters a token is multiplied by (a MoE layer's router, shared and top-k
    experts); HBM holds every weight (`ModelShape.weight_bytes`) but a step reads only the experts its
    tokens touch (`ModelShape.experts_touched`). Attention work per (query, key) pair follows the
    attention kind: 4 x heads x head_dim for MHA/GQA (QK^T and PV); for MLA, attention in the latent
    as DeepSeek's absorbed form (and FlashMLA) runs it, 2 x heads x (kv_lora_rank + rope dim) for the
    scores plus 2 x heads x kv_lora_rank for the values. A sliding-window layer attends and reads at
    most its window. With `allreduce` given and gpus > 1, each layer pays two all-reduces of its
    tokens' activations (`sim.collectives`) inside its per-layer time (they run on the compute
    stream, so the layer-wise preload overlaps them like compute). KV is split by KV heads
    (`kv_shards`): replicated copies cost HBM, reads and host-link traffic.

    With measured efficiencies, `attention` names the kernel a prefill over a history and a decode step
    run: "flash" (FlashAttention-2, causal: serving engines, run 13's layers, the batched executor) or
    "masked" (the prefill-first executor's padded graphs, `gpu/prefill_graph.py` and `gpu/decode_graph.py`:
    a dense mask, the kernel over the whole rectangle; `RooflineEfficiency.masked_attention_s`, which needs
    the GPU's `sms`). A masked decode step is flash's unless a KV head serves several query heads (GQA),
    whose group the executor folds into the rows of one block per sequence and KV head.
    Mixed steps (`mixed_layer_s`) are the batched executor's: flash either way.
    """
    # KV split over every GPU by requests (expert parallelism's data-parallel attention), not by KV heads
    _kv_by_requests = False

    def __init__(self, shape: ModelShape, gpus: int, peak_flops: float, hbm_bw_gbps: float,
                 prefill_mfu: float, decode_mbu: float, h2d_gbps: float, d2h_gbps: float,
                 ssd_read_gbps: float, ssd_write_gbps: float, *, ssd_contention: Optional[str] = None,
                 hbm_kv_bytes: Optional[float] = None, allreduce: Optional[AllReduceCost] = None,
                 efficiency: Optional[RooflineEfficiency] = None, attention: str = "flash", sms: int = 0):
        super().__init__(shape, layer_copy_overhead_s=0.0, layer_gate_s=0.0, host_turn_s=0.0,
                         host_next_turn_s=0.0, measured_contention=None, ssd_contention=ssd_contention,
                         hbm_kv_bytes=hbm_kv_bytes)
        self.gpus = gpus
        self._flops = peak_flops * gpus
        self._mfu = prefill_mfu
        self._bw = hbm_bw_gbps * GB * gpus
        self._mbu = decode_mbu
        s = shape
        self.kv_shards = gpus if self._kv_by_requests else kv_shards(s, gpus)
        # each GPU has its own PCIe link and moves its own shard of the KV; replicated heads travel
        # once per copy, so a load goes at the speed of the links of one copy
        self._h2d = h2d_gbps * GB * (gpus if self.kv_shards == gpus else self.kv_shards)
        self._d2h = d2h_gbps * GB * gpus
        self._ssd_r = ssd_read_gbps * GB
        self._ssd_w = ssd_write_gbps * GB
        self._allreduce = allreduce if gpus > 1 else None
        self._w_layer_bytes = s.params_per_layer * s.dtype_bytes
        self._lin_flops_tok = 2.0 * s.params_per_layer
        self._attn_flops = 4.0 * s.heads * s.head_dim  # QK^T and PV, per (query, key) pair
        self._kv_tok = s.kv_bytes_per_token_layer
        self._head_bytes = s.vocab * s.hidden * s.dtype_bytes
        self._head_flops = 2.0 * s.vocab * s.hidden
        # the closed forms below are the whole model for a dense, full-attention shape whose KV is
        # split evenly; anything else takes the general per-layer path
        self._eff = efficiency
        if attention not in ("flash", "masked"):
            raise KvsimError(f"RooflineCost: attention {attention!r}; expected 'flash' or 'masked'")
        self._masked = attention == "masked"
        if self._masked and (efficiency is None or sms <= 0 or s.attention == "mla" or s.sliding_layers):
            raise KvsimError(f"RooflineCost: attention 'masked' (the prefill-first executor's kernel) for {s.name}: "
                             "expected measured efficiencies, the GPU's SM count and a full-attention MHA/GQA shape")
        self._sms = sms
        self._masked_decode = False  # set below: the executor's GQA decode graphs
        # the flash kernel's query tile (0: the constant roofline prices the real rows)
        self._tile = efficiency.query_tile if efficiency is not None else 0
        self._plain = (not s.experts and not s.sliding_layers and s.attention != "mla"
                       and self._allreduce is None and self.kv_shards == gpus and efficiency is None)
        self._slide = s.sliding_layers
        if self._plain:
            self._kinks_by_batch = {}  # one compute/memory crossing per batch size
        if not self._plain:
            L = s.layers
            kv_copies = gpus / self.kv_shards
            self._kv_tok = s.kv_bytes_per_token_layer * kv_copies
            if s.attention == "mla":
                self._attn_flops = 2.0 * s.heads * (2 * s.kv_lora_rank + s.qk_rope_head_dim)
            self._lin_flops_tok = 2.0 * s.active_layer_params / L
            # per layer, as the mean over layers: weights every step reads, and one routed expert
            routed = s.routed_expert_params
            self._w_layer_bytes = (s.layer_params - routed) * s.dtype_bytes / L
            self._w_expert_bytes = s.moe_layers * s.expert_params * s.expert_element_bytes / L
        if efficiency is not None:
            # per kernel, against its measured share of the peaks (sim/efficiency.py)
            L = s.layers
            routed_tok = 2.0 * s.moe_layers * s.experts_per_token * s.expert_params / L
            self._lin_dense_tok = self._lin_flops_tok - routed_tok  # runs over every token
            self._lin_routed_tok = routed_tok  # each routed expert sees only the tokens that chose it
            self._attn_F = self._flops * efficiency.attention_flops
            self._kv_BW = self._bw * efficiency.kv_bw
            self._act_tok_s = efficiency.act_bytes_per_token(s, gpus) / (hbm_bw_gbps * GB)
            self._gemm_act_tok = gemm_act_bytes_per_token(s, gpus)  # one GPU's GEMM activations a token
            # one GPU's heads (the masked kernel's blocks): query heads split over the GPUs, KV heads over
            # the KV shards (a replicated KV head is one head on each of its GPUs)
            self._q_heads_gpu = s.heads / gpus
            self._kv_heads_gpu = s.kv_heads / self.kv_shards
            # the executor's decode graphs attend through a dense (padding) mask too, with one query per
            # sequence. MHA: one query row a (sequence, head), which the kernel spreads over the keys: KV-bound
            # as flash (the LLaMA-2 7B / 13B decode tables). GQA: a KV head's g query heads fold into g rows,
            # and batch x kv_heads blocks each walk every key (Llama-3.1-8B's table: ~20 ns a context token
            # at batch <= 16, whatever the batch): `masked_attention_s` with new = 1
            self._masked_decode = self._masked and self._q_heads_gpu > self._kv_heads_gpu
            # with attention priced apart from the GEMMs, a decode step is linear in the context for a
            # fixed batch: its only kink is a sliding window filling up (batch x window)
            self._kinks_by_batch = {}
            self._decode_fixed = {}  # batch -> the step's GEMMs, other kernels and communication
            self._by_tokens = {}  # tokens -> `_token_layer_s`
            self._heads = {}  # sequences -> `decode_head_s`
        # decode_step_s is called twice per decode span: fold its constants once
        F, BW, L = self._flops * self._mfu, self._bw * self._mbu, s.layers
        self._Lf = float(L)  # for `iteration_s` (see `_span_consts`)
        self._d_lin = L * self._lin_flops_tok / F  # per sequence, compute side
        self._d_att = L * self._attn_flops / F  # per context token, compute side
        self._d_w = L * self._w_layer_bytes / BW  # weights read, memory side
        self._d_kv = L * self._kv_tok / BW  # per context token, memory side
        self._d_head_c = self._head_flops / F
        self._d_head_m = self._head_bytes / BW
        # measured efficiencies, full attention, flash decode: a decode step is its batch's fixed terms
        # plus one attention term linear in the context, which `decode_step_s` and `decode_span` compute inline
        # (any step priced otherwise must clear this flag, or the span would not follow it)
        self._linear_decode = efficiency is not None and not self._slide and not self._masked_decode
        self._span_fixed = self._decode_fixed if self._linear_decode else {}
        # layers as a float in the hot paths' constants: an int times a float is the same product, but only a
        # float times a float takes the interpreter's specialised multiply
        Lf = float(L)
        self._span_consts = (self._attn_flops, self._attn_F, self._kv_tok, self._kv_BW, Lf) if self._linear_decode else None
        # the attention term is max(compute, KV read), each the context times a slope, rounded twice (within
        # 3e-16 of the exact product): where the two slopes differ by far more than that, one side wins at
        # every context, and `decode_span` computes only that side, the same float bit for bit
        self._span_side = None
        self._span_terms = {}  # batch -> (its fixed terms, the winning side's two constants, layers)
        if self._linear_decode:
            att, kvr = self._attn_flops / self._attn_F, self._kv_tok / self._kv_BW
            if kvr > att * (1.0 + 1e-9):
                self._span_side = (self._kv_tok, self._kv_BW, Lf)
            elif att > kvr * (1.0 + 1e-9):
                self._span_side = (self._attn_flops, self._attn_F, Lf)
        # `iteration_s` with `mixed_layer_s` and `decode_head_s` inline, where both are this class's own
        # measured-efficiency paths over full attention (a subclass that prices them otherwise keeps the calls)
        cls = type(self)
        self._fused_iteration = (efficiency is not None and not self._slide and not self._own_iteration
                                 and cls.mixed_layer_s is RooflineCost.mixed_layer_s
                                 and cls.decode_head_s is RooflineCost.decode_head_s)

    def comm_layer_s(self, tokens: float) -> float:
        """Tensor-parallel communication of one layer over `tokens` tokens: its two all-reduces."""
        if self._allreduce is None or tokens <= 0:
            return 0.0
        return ALLREDUCES_PER_LAYER * self._allreduce(allreduce_bytes_per_layer(self.shape, tokens), self.gpus)

    def _gemms_s(self, tokens: float) -> float:
        """Measured efficiencies: one layer's GEMMs over `tokens` tokens (mean over layers), each routed
        expert over the tokens that chose it, plus the layer's other kernels (norms, RoPE, activations)."""
        e, s = self._eff, self.shape
        # over the pooled bandwidth, every GPU's own activations: gpus x one GPU's bytes
        t = e.gemm_s(self._lin_dense_tok * tokens, self._w_layer_bytes + tokens * self._gemm_act_tok * self.gpus,
                     tokens, self._flops, self._bw, GEMMS_PER_LAYER)
        if s.experts and tokens > 0:
            touched = s.experts_touched(tokens)
            t += e.gemm_s(self._lin_routed_tok * tokens, self._w_expert_bytes * touched,
                          tokens * s.experts_per_token / touched, self._flops, self._bw, ROUTED_GEMMS)
        return t + e.layer_fixed_s + tokens * self._act_tok_s

    def _token_layer_s(self, tokens: int) -> tuple:
        """Measured efficiencies: (GEMMs and other kernels, all-reduces) of a layer over `tokens` tokens,
        the parts that depend only on the token count, looked up once per count: a step's token count repeats (a chunk
        plus the decodes riding along), and each evaluation walks the GEMM sweep's table."""
        t = self._by_tokens.get(tokens)
        if t is None:
            t = (self._gemms_s(tokens), self.comm_layer_s(tokens))
            if len(self._by_tokens) < 65536:  # integer counts up to the token budget: bounded in practice
                self._by_tokens[tokens] = t
        return t

    def _attention_s(self, pairs: float, kv: float, pairs_w: float = 0.0, kv_w: float = 0.0) -> float:
        """Measured efficiencies: attention of one layer (mean over layers) over `pairs` (query, key)
        pairs reading/writing `kv` tokens of KV; a sliding-window layer over `pairs_w` and `kv_w`."""
        L, slide, a, kv_tok = self.shape.layers, self._slide, self._attn_flops, self._kv_tok
        c, m = a * pairs / self._attn_F, kv_tok * kv / self._kv_BW
        t = (L - slide) * (c if c > m else m)
        if slide:
            c, m = a * pairs_w / self._attn_F, kv_tok * kv_w / self._kv_BW
            t += slide * (c if c > m else m)
        return t / L

    def _weights_read(self, tokens: float) -> float:
        """Weight bytes one layer reads (mean over layers) for a step over `tokens` tokens."""
        if not self.shape.experts:
            return self._w_layer_bytes
        return self._w_layer_bytes + self._w_expert_bytes * self.shape.experts_touched(tokens)

    def prefill_layer_s(self, new: float, hist: float) -> float:
        return self.prefill_compute_layer_s(new, hist) + self.comm_layer_s(new)

    def prefill_compute_layer_s(self, new: float, hist: float) -> float:
        if self._plain:
            flops = self._lin_flops_tok * new + self._attn_flops * new * (hist + (new + 1) / 2.0)
            byts = self._w_layer_bytes + self._kv_tok * (hist + 2.0 * new)
            return max(flops / (self._flops * self._mfu), byts / (self._bw * self._mbu))
        if self._eff is not None:
            e = self._eff
            if self._masked and hist > 0:
                c = e.masked_attention_s(self.shape.head_dim, self._q_heads_gpu, self._kv_heads_gpu, new, hist,
                                         self._flops / self.gpus, self._sms)
                m = self._kv_tok * (hist + 2.0 * new) / self._kv_BW
                return self._gemms_s(new) + (c if c > m else m) + e.masked_fixed_s
            # the flash kernel computes whole query tiles: pairs of the padded rows
            rows = e.padded_rows(new)
            W = self.shape.sliding_window
            pw, kw = (sliding_pairs(new, hist, W) * rows / new, min(hist, W) + 2.0 * new) if self._slide else (0.0, 0.0)
            return self._gemms_s(new) + self._attention_s(rows * (hist + (new + 1) / 2.0), hist + 2.0 * new, pw, kw)
        F, BW = self._flops * self._mfu, self._bw * self._mbu
        lin, w = self._lin_flops_tok * new, self._weights_read(new)
        L, slide = self.shape.layers, self._slide
        t = (L - slide) * max((lin + self._attn_flops * new * (hist + (new + 1) / 2.0)) / F,
                              (w + self._kv_tok * (hist + 2.0 * new)) / BW)
        if slide:
            W = self.shape.sliding_window
            t += slide * max((lin + self._attn_flops * sliding_pairs(new, hist, W)) / F,
                             (w + self._kv_tok * (min(hist, W) + 2.0 * new)) / BW)
        return t / L

    def prefill_head_s(self, new: float) -> float:
        # only the last position's logits are needed to emit the first token
        if self._eff is not None:
            return self._eff.gemm_s(self._head_flops, self._head_bytes, 1, self._flops, self._bw, 1)
        return max(self._head_flops / (self._flops * self._mfu), self._head_bytes / (self._bw * self._mbu))

    def decode_head_s(self, batch: int) -> float:
        if self._eff is not None:
            t = self._heads.get(batch)
            if t is None:
                t = self._eff.gemm_s(self._head_flops * batch, self._head_bytes, batch, self._flops, self._bw, 1)
                if len(self._heads) < 65536:
                    self._heads[batch] = t
            return t
        head = self._d_head_c * batch
        return head if head > self._d_head_m else self._d_head_m

    def iteration_s(self, chunks, batch: int, context_tokens: float, load_layer_s: float = 0.0,
                    buffer_layers: int = 2, layerwise: bool = True) -> float:
        """`CostModel.iteration_s` with `mixed_layer_s`'s measured-efficiency, full-attention path and the
        cached `decode_head_s` inline (`_fused_iteration`): the same operations in the same order, two calls
        fewer per step."""
        if not self._fused_iteration:
            return CostModel.iteration_s(self, chunks, batch, context_tokens, load_layer_s, buffer_layers, layerwise)
        new = 0
        pairs = kv = 0.0
        tile = self._tile
        for n, h in chunks:
            new += n
            q = -(-n // tile) * tile if tile and n > 1 else n
            pairs += q * (h + (n + 1) / 2.0)
            kv += h + 2.0 * n
        tokens = new + batch
        L = self._Lf
        if tokens <= 0:
            layer = 0.0
        else:
            pairs += context_tokens
            kv += context_tokens
            g = self._by_tokens.get(tokens)
            g, comm = g if g is not None else self._token_layer_s(tokens)
            c, m = self._attn_flops * pairs / self._attn_F, self._kv_tok * kv / self._kv_BW
            layer = g + L * (c if c > m else m) / L + comm
        heads = len(chunks) + batch
        if heads:
            try:  # as `decode_span`'s terms: a miss is once per count
                head = self._heads[heads]
            except KeyError:
                head = self.decode_head_s(heads)
        else:
            head = 0.0
        if load_layer_s <= 0.0:  # `preload_pipeline_s`, as `CostModel.iteration_s`
            t = L * layer
        else:
            if layerwise:
                layer += self.layer_gate_s
            if not layerwise or buffer_layers < 2:
                t = L * (load_layer_s + layer)
            else:
                t = load_layer_s + layer + (L - 1) * (load_layer_s if load_layer_s >= layer else layer)
        return t + head + self.host_turn_s

    def mixed_layer_s(self, chunks, batch: int, context_tokens: float) -> float:
        """One layer over prefill chunks `[(new, cached), ...]` and `batch` decodes over `context_tokens`
        tokens in all, as one forward pass: the weights are read once and the linear layers run over
        every token; attention is each chunk's (new x (cached + causal half)) plus each decode's context;
        KV reads are every cached and decode token, writes every new token. With measured efficiencies a
        chunk's queries count in whole flash tiles (`RooflineEfficiency.padded_rows`)."""
        # sequential sums in one pass (as sum() adds them)
        new = 0
        pairs = kv = 0.0
        tile = self._tile
        for n, h in chunks:
            new += n
            q = -(-n // tile) * tile if tile and n > 1 else n
            pairs += q * (h + (n + 1) / 2.0)
            kv += h + 2.0 * n
        tokens = new + batch
        if tokens <= 0:
            return 0.0
        pairs += context_tokens
        kv += context_tokens
        if self._eff is not None:
            if self._slide:
                W = self.shape.sliding_window
                seen = batch * min(context_tokens / batch, W) if batch else 0.0
                pw = sum(sliding_pairs(n, h, W) * self._eff.padded_rows(n) / n for n, h in chunks if n) + seen
                kw = sum(min(h, W) + 2.0 * n for n, h in chunks) + seen
                g, comm = self._token_layer_s(tokens)
                return g + self._attention_s(pairs, kv, pw, kw) + comm
            # `_attention_s` without a sliding window, inline: the chunked engine prices every step here
            g = self._by_tokens.get(tokens)
            g, comm = g if g is not None else self._token_layer_s(tokens)
            c, m = self._attn_flops * pairs / self._attn_F, self._kv_tok * kv / self._kv_BW
            L = self.shape.layers
            return g + L * (c if c > m else m) / L + comm
        F, BW = self._flops * self._mfu, self._bw * self._mbu
        lin, w = self._lin_flops_tok * tokens, self._weights_read(tokens)
        L, slide = self.shape.layers, (self._slide if not self._plain else 0)
        t = (L - slide) * max((lin + self._attn_flops * pairs) / F, (w + self._kv_tok * kv) / BW)
        if slide:
            W = self.shape.sliding_window
            pairs_w = sum(sliding_pairs(n, h, W) for n, h in chunks) + batch * min(context_tokens / batch, W) \
                if batch else sum(sliding_pairs(n, h, W) for n, h in chunks)
            kv_w = sum(min(h, W) + 2.0 * n for n, h in chunks) + (batch * min(context_tokens / batch, W) if batch else 0.0)
            t += slide * max((lin + self._attn_flops * pairs_w) / F, (w + self._kv_tok * kv_w) / BW)
        return t / L + self.comm_layer_s(tokens)

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        """One iteration for `batch` sequences holding `context_tokens` tokens in total:
        per layer max(FLOPs / (peak x MFU), bytes / (bandwidth x MBU)), plus the LM head. Sliding-window
        layers see each sequence's mean context, capped at the window; the all-reduces are `comm_s`."""
        if self._eff is not None:
            fixed = self._decode_fixed.get(batch)
            if fixed is None or not self._linear_decode:
                return self.decode_parts(batch, context_tokens)[0] + self._decode_fixed[batch][1]
            # `decode_parts` and `_attention_s` inline for full attention (the same operations in the same
            # order): called twice per decode span
            c, m = self._attn_flops * context_tokens / self._attn_F, self._kv_tok * context_tokens / self._kv_BW
            L = self.shape.layers
            return fixed[0] + L * (L * (c if c > m else m) / L) + fixed[1]
        head = self._d_head_c * batch
        head = head if head > self._d_head_m else self._d_head_m
        if self._plain:
            comp = self._d_lin * batch + self._d_att * context_tokens
            mem = self._d_w + self._d_kv * context_tokens
            return (comp if comp > mem else mem) + head
        return self.decode_parts(batch, context_tokens)[0] + head

    def decode_span(self, batch: int, context_tokens: float, kmax: int, budget_s: float = math.inf) -> tuple:
        """`CostModel.decode_span`; with measured efficiencies and full attention the step is one linear
        piece (no kink), its two ends `decode_step_s`'s operations inline (the hottest call): here with the
        batch's terms and the winning side of the attention term (`_span_terms`), else `_decode_span_both`."""
        try:  # a subscript costs less than `.get` (a method call); a miss is once per batch size
            f0, f1, num, den, L = self._span_terms[batch]
        except KeyError:
            return self._decode_span_both(batch, context_tokens, kmax, budget_s)
        a = f0 + L * (L * (num * context_tokens / den) / L) + f1
        if kmax > 1:
            d = (f0 + L * (L * (num * (context_tokens + batch * (kmax - 1)) / den) / L) + f1 - a) / (kmax - 1)
        else:
            d = 0.0
        piece = kmax * a + d * kmax * (kmax - 1) * 0.5
        if budget_s < piece:
            return _cut_piece(a, d, kmax, budget_s)
        return piece, kmax

    def _decode_span_both(self, batch: int, context_tokens: float, kmax: int, budget_s: float) -> tuple:
        """`decode_span` the first time at a batch size, or where neither side of the attention term wins at
        every context (both computed, as `decode_step_s`)."""
        fixed = self._span_fixed.get(batch)
        if fixed is None:
            return CostModel.decode_span(self, batch, context_tokens, kmax, budget_s)
        f0, f1, _ = fixed
        if self._span_side is not None:
            self._span_terms[batch] = (f0, f1) + self._span_side
            return self.decode_span(batch, context_tokens, kmax, budget_s)
        af, aF, kv, kvBW, L = self._span_consts
        c, m = af * context_tokens / aF, kv * context_tokens / kvBW
        a = f0 + L * (L * (c if c > m else m) / L) + f1
        if kmax > 1:
            x = context_tokens + batch * (kmax - 1)
            c, m = af * x / aF, kv * x / kvBW
            d = (f0 + L * (L * (c if c > m else m) / L) + f1 - a) / (kmax - 1)
        else:
            d = 0.0
        piece = kmax * a + d * kmax * (kmax - 1) * 0.5
        if budget_s < piece:
            return _cut_piece(a, d, kmax, budget_s)
        return piece, kmax

    def decode_parts(self, batch: int, context_tokens: float) -> tuple[float, float]:
        """(the decode step's layers with their communication, that communication `comm_s`)."""
        L, slide = self.shape.layers, self._slide
        if self._eff is not None:
            fixed = self._decode_fixed.get(batch)
            if fixed is None:  # what does not move with the context, once per batch size
                comm = L * self.comm_layer_s(batch)
                fixed = self._decode_fixed[batch] = (L * self._gemms_s(batch) + comm, self.decode_head_s(batch), comm)
            if self._masked_decode and batch > 0:
                return fixed[0] + L * self._masked_decode_s(batch, context_tokens), fixed[2]
            seen = batch * min(context_tokens / batch, self.shape.sliding_window) if slide else 0.0
            return fixed[0] + L * self._attention_s(context_tokens, context_tokens, seen, seen), fixed[2]
        F, BW = self._flops * self._mfu, self._bw * self._mbu
        lin, w = self._lin_flops_tok * batch, self._weights_read(batch)
        t = (L - slide) * max((lin + self._attn_flops * context_tokens) / F,
                              (w + self._kv_tok * context_tokens) / BW)
        if slide:
            seen = batch * min(context_tokens / batch, self.shape.sliding_window)
            t += slide * max((lin + self._attn_flops * seen) / F, (w + self._kv_tok * seen) / BW)
        comm = L * self.comm_layer_s(batch)
        return t + comm, comm

    def _masked_decode_s(self, batch: int, context_tokens: float) -> float:
        """Attention of one layer of the executor's GQA decode graph (attention "masked"): the slower of
        the masked kernel's walk (`batch` sequences, one new query each over context_tokens / batch keys)
        and the KV read at its bandwidth share."""
        e = self._eff
        c = e.masked_attention_s(self.shape.head_dim, self._q_heads_gpu, self._kv_heads_gpu, 1,
                                 context_tokens / batch - 1.0, self._flops / self.gpus, self._sms, seqs=batch)
        m = self._kv_tok * context_tokens / self._kv_BW
        return c if c > m else m

    def decode_next_kink(self, batch: int, context_tokens: float) -> float:
        # a layer's compute (lin + att C) and memory (w + kv C) sides cross once, if their slopes
        # differ; a sliding-window layer's context stops growing at batch x window
        if self._plain:
            if self._d_att == self._d_kv:
                return math.inf
            crossing = (self._d_w - self._d_lin * batch) / (self._d_att - self._d_kv)
            return crossing if crossing > context_tokens else math.inf
        if self._eff is not None:
            k = batch * self.shape.sliding_window if self._slide else math.inf
            return k if k > context_tokens else math.inf
        kinks = []
        F, BW = self._flops * self._mfu, self._bw * self._mbu
        slope = self._attn_flops / F - self._kv_tok / BW
        if slope:
            kinks.append((self._weights_read(batch) / BW - self._lin_flops_tok * batch / F) / slope)
        if self._slide:
            kinks.append(batch * self.shape.sliding_window)
        later = [k for k in kinks if k > context_tokens]
        return min(later) if later else math.inf

    def h2d_bw(self, chunk_bytes: float) -> float:
        return self._h2d

    def d2h_bw(self, chunk_bytes: float) -> float:
        return self._d2h

    def ssd_read_bw(self, chunk_bytes: float) -> float:
        return self._ssd_r

    def ssd_write_bw(self, chunk_bytes: float) -> float:
        return self._ssd_w


def busiest_gpu_pairs(tokens: float, experts_per_token: int, gpus: int) -> float:
    """Expert parallelism: (token, expert) pairs the busiest of `gpus` GPUs serves in one MoE layer when
    `tokens` tokens each choose `experts_per_token` experts spread evenly over the GPUs. Each GPU's load
    is Binomial(n, 1/gpus) with n = tokens x k pairs; the largest of gpus such loads is estimated as
    balls in bins are, mean + sqrt(2 ln gpus) x std, and is at most every pair."""
    n = tokens * experts_per_token
    if gpus <= 1 or n <= 0:
        return max(n, 0.0)
    p = 1.0 / gpus
    return min(n * p + math.sqrt(2.0 * math.log(gpus) * n * p * (1.0 - p)), n)


class ExpertParallelCost(RooflineCost):
    """The roofline of a replica of N GPUs serving a MoE model with data-parallel attention and expert
    parallelism (`gpu.expert_parallel`: SGLang's and vLLM's "DP attention + EP", as DeepSeek-V3 and
    Qwen3-MoE are deployed), where `RooflineCost` is tensor-parallel. A step's GPUs run in lockstep (each
    MoE layer's all-to-alls join them), so each layer takes its busiest GPU's time:

    * non-expert work (attention, dense MLP layers, shared experts, routers, LM head) is data-parallel:
      every GPU holds a full copy of those weights and reads it each step, and runs whole requests. The
      busiest GPU holds max(tokens / N, the step's largest request) of the step's tokens (a request is
      not split: a lone prefill runs on one GPU while the others wait on its all-to-alls) and that share
      of the step's attention pairs and KV reads;
    * each MoE layer's routed experts are spread experts / N per GPU; the step's tokens x k (token,
      expert) pairs go to their experts' GPUs, the busiest serving `busiest_gpu_pairs` of them (uniform
      routing: no expert-load balancer, EPLB or redundant experts) and reading the experts they touch
      among its own (`ModelShape.experts_touched_on_gpu`);
    * two all-to-alls per MoE layer (dispatch and combine), the busiest GPU sending its tokens' pairs
      (`sim.collectives.LinkAllToAll`, over the GPU link: no all-to-all has been measured); no all-reduce.

    KV is split by requests, so nothing is replicated (MLA's latent included). Host links are every
    GPU's own, pooled as under TP (a request's own load really crosses one GPU's link). The prefill-first
    engine sums its batch's per-request layer times (each on one GPU), as it does under TP.
    """
    _kv_by_requests = True

    def __init__(self, shape: ModelShape, gpus: int, peak_flops: float, hbm_bw_gbps: float,
                 prefill_mfu: float, decode_mbu: float, h2d_gbps: float, d2h_gbps: float,
                 ssd_read_gbps: float, ssd_write_gbps: float, *, alltoall: Optional[LinkAllToAll] = None,
                 efficiency: Optional[RooflineEfficiency] = None, **kw):
        if gpus < 2 or not shape.experts or shape.experts % gpus:
            raise KvsimError(f"ExpertParallelCost: {shape.name} on {gpus} GPUs: expected >= 2 GPUs and a MoE "
                             f"shape whose experts ({shape.experts}) they divide")
        if kw.get("attention", "flash") != "flash":
            raise KvsimError("ExpertParallelCost: attention 'masked' is the TP executor's kernel; expected 'flash'")
        super().__init__(shape, gpus, peak_flops, hbm_bw_gbps, prefill_mfu, decode_mbu, h2d_gbps, d2h_gbps,
                         ssd_read_gbps, ssd_write_gbps, allreduce=None, efficiency=efficiency, **kw)
        s, L = shape, shape.layers
        routed_tok = 2.0 * s.moe_layers * s.experts_per_token * s.expert_params / L
        self._dense_tok = self._lin_flops_tok - routed_tok  # a token's non-expert FLOPs per layer (mean)
        self._pair_flops = routed_tok / s.experts_per_token  # one (token, routed expert) pair's, per layer
        self._moe_share = s.moe_layers / L  # the all-to-alls are the MoE layers' only
        self._alltoall = alltoall
        self._gpu_F, self._gpu_BW = peak_flops, hbm_bw_gbps * GB  # one GPU's peaks: the busiest GPU's time
        # the TP step's inline closed forms do not price this step (decode_step_s and decode_span are below)
        self._linear_decode, self._span_fixed, self._span_consts, self._span_side = False, {}, None, None
        self._span_terms = {}
        if efficiency is not None:
            # a GPU runs its tokens' whole non-expert layer: the TP shard's activations at one GPU
            self._ep_gemm_act_tok = gemm_act_bytes_per_token(s, 1)
            self._ep_act_tok_s = efficiency.act_bytes_per_token(s, 1) / self._gpu_BW

    def busiest_tokens(self, tokens: float, largest: float) -> float:
        """Tokens of the GPU with the most non-expert work in a step of `tokens` tokens whose largest
        request brings `largest`: the even share, or that request alone (the makespan's lower bound)."""
        share = tokens / self.gpus
        return share if share > largest else largest

    def alltoall_layer_s(self, busiest: float) -> float:
        """Per layer (mean over layers): the MoE layers' dispatch and combine, the busiest GPU sending
        `busiest` tokens' pairs; 0 without an all-to-all cost (`gpu.allreduce: none`)."""
        if self._alltoall is None or busiest <= 0:
            return 0.0
        one = self._alltoall(alltoall_bytes_per_gpu(self.shape, busiest, self.gpus), self.gpus)
        return self._moe_share * ALLTOALLS_PER_MOE_LAYER * one

    def comm_layer_s(self, tokens: float) -> float:
        """All-to-alls of a batched prefill over `tokens` tokens (the prefill-first engine's), spread evenly."""
        return self.alltoall_layer_s(tokens / self.gpus)

    def _gpu_lin_weights(self, tokens: float, busiest: float) -> tuple:
        """(FLOPs, weight bytes) of one layer (mean over layers) on the busiest GPU, its attention apart:
        its non-expert GEMMs over `busiest` tokens with a full copy of their weights, and its routed
        pairs with the experts they touch."""
        s, N = self.shape, self.gpus
        pairs = busiest_gpu_pairs(tokens, s.experts_per_token, N)
        return (self._dense_tok * busiest + self._pair_flops * pairs,
                self._w_layer_bytes + self._w_expert_bytes * s.experts_touched_on_gpu(pairs, N))

    def ep_layer_s(self, tokens: float, busiest: float, pairs: float, kv: float, pairs_w: float = 0.0,
                   kv_w: float = 0.0) -> float:
        """One layer (mean over layers) on the busiest GPU of a step over `tokens` tokens, `busiest` of
        them its own: that share of the step's attention `pairs` and KV tokens `kv` (a sliding-window
        layer's `pairs_w`, `kv_w`), its routed pairs, no communication."""
        if tokens <= 0:
            return 0.0
        s, N = self.shape, self.gpus
        share = busiest / tokens
        F, BW = self._gpu_F, self._gpu_BW
        if self._eff is not None:
            e = self._eff
            t = e.gemm_s(self._dense_tok * busiest, self._w_layer_bytes + busiest * self._ep_gemm_act_tok, busiest,
                         F, BW, GEMMS_PER_LAYER)
            routed = busiest_gpu_pairs(tokens, s.experts_per_token, N)
            touched = s.experts_touched_on_gpu(routed, N)
            t += e.gemm_s(self._pair_flops * routed, self._w_expert_bytes * touched, routed / touched, F, BW,
                          ROUTED_GEMMS)
            g = N * share  # `_attention_s` divides by all N GPUs' peaks: N x the busiest GPU's share
            return (t + e.layer_fixed_s + busiest * self._ep_act_tok_s
                    + self._attention_s(pairs * g, kv * g, pairs_w * g, kv_w * g))
        lin, w = self._gpu_lin_weights(tokens, busiest)
        F, BW, a, kv_tok = F * self._mfu, BW * self._mbu, self._attn_flops * share, self._kv_tok * share
        L, slide = s.layers, self._slide
        t = (L - slide) * max((lin + a * pairs) / F, (w + kv_tok * kv) / BW)
        if slide:
            t += slide * max((lin + a * pairs_w) / F, (w + kv_tok * kv_w) / BW)
        return t / L

    def prefill_layer_s(self, new: float, hist: float) -> float:
        return self.prefill_compute_layer_s(new, hist) + self.alltoall_layer_s(new)

    def prefill_compute_layer_s(self, new: float, hist: float) -> float:
        """One request's prefill layer: its non-expert work on one GPU, its routed pairs over all."""
        if new <= 0:
            return 0.0
        rows = self._eff.padded_rows(new) if self._eff is not None else new
        W = self.shape.sliding_window
        pw, kw = (sliding_pairs(new, hist, W) * rows / new, min(hist, W) + 2.0 * new) if self._slide else (0.0, 0.0)
        return self.ep_layer_s(new, new, rows * (hist + (new + 1) / 2.0), hist + 2.0 * new, pw, kw)

    def _gpu_head_s(self, rows: float) -> float:
        """The LM head over `rows` sequences on one GPU (each holds it whole)."""
        F, BW = self._gpu_F, self._gpu_BW
        if self._eff is not None:
            return self._eff.gemm_s(self._head_flops * rows, self._head_bytes, rows, F, BW, 1)
        return max(self._head_flops * rows / (F * self._mfu), self._head_bytes / (BW * self._mbu))

    def prefill_head_s(self, new: float) -> float:
        return self._gpu_head_s(1)

    def decode_head_s(self, batch: int) -> float:
        return self._gpu_head_s(self.busiest_tokens(batch, 1.0))

    def mixed_layer_s(self, chunks, batch: int, context_tokens: float) -> float:
        """`RooflineCost.mixed_layer_s`'s step on the busiest GPU: the largest chunk (or a decode) is one
        GPU's at least."""
        new, largest = 0, (1 if batch else 0)
        pairs = kv = pw = kw = 0.0
        tile, W = self._tile, self.shape.sliding_window
        for n, h in chunks:
            new += n
            if n > largest:
                largest = n
            q = -(-n // tile) * tile if tile and n > 1 else n
            pairs += q * (h + (n + 1) / 2.0)
            kv += h + 2.0 * n
            if self._slide and n:
                pw += sliding_pairs(n, h, W) * q / n
                kw += min(h, W) + 2.0 * n
        tokens = new + batch
        if tokens <= 0:
            return 0.0
        pairs += context_tokens
        kv += context_tokens
        if self._slide and batch:
            seen = batch * min(context_tokens / batch, W)
            pw += seen
            kw += seen
        b = self.busiest_tokens(tokens, largest)
        return self.ep_layer_s(tokens, b, pairs, kv, pw, kw) + self.alltoall_layer_s(b)

    def decode_parts(self, batch: int, context_tokens: float) -> tuple[float, float]:
        L, b = self.shape.layers, self.busiest_tokens(batch, 1.0)
        seen = batch * min(context_tokens / batch, self.shape.sliding_window) if self._slide else 0.0
        comm = L * self.alltoall_layer_s(b)
        return L * self.ep_layer_s(batch, b, context_tokens, context_tokens, seen, seen) + comm, comm

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        return self.decode_parts(batch, context_tokens)[0] + self.decode_head_s(batch)

    # the generic piecewise-linear sum (`RooflineCost`'s inline closed forms are the TP step's)
    decode_span = CostModel.decode_span

    def decode_next_kink(self, batch: int, context_tokens: float) -> float:
        # measured efficiencies price attention apart from the GEMMs, linear in the context: only a
        # sliding window filling up bends the step; the constant roofline's compute and memory sides cross
        kinks = [batch * self.shape.sliding_window] if self._slide else []
        if self._eff is None:
            b = self.busiest_tokens(batch, 1.0)
            lin, w = self._gpu_lin_weights(batch, b)
            F, BW = self._gpu_F * self._mfu, self._gpu_BW * self._mbu
            slope = b / batch * (self._attn_flops / F - self._kv_tok / BW)
            if slope:
                kinks.append((w / BW - lin / F) / slope)
        later = [k for k in kinks if k > context_tokens]
        return min(later) if later else math.inf


class ProfileCost(CostModel):
    """Measured tables in place of the roofline, at the tensor-parallel degree they were measured at
    (the profile's `tp`): a TP profile's layer times hold the all-reduces, so they are used as they are.

    KV moves as each GPU's KV-head shard over its own host link (`kv_shards`): a layer's load of
    `chunk` bytes is `chunk / shards` bytes on each of `shards` links at once, at the rate the profile
    measured for that size with all its GPUs copying together.
    """

    def __init__(self, shape: ModelShape, profile: HardwareProfile, gpus: int = 1, *,
                 ssd_contention: Optional[str] = None, hbm_kv_bytes: Optional[float] = None):
        if shape.name not in profile.models:
            raise KvsimError(f"{profile.path}: models: no tables for model {shape.name!r}; "
                             f"profiled models are {', '.join(profile.models)}")
        if gpus != profile.tp:
            raise KvsimError(f"{profile.path}: tp: the tables were measured at tensor-parallel degree {profile.tp}; "
                             f"expected gpu.count {profile.tp}, got gpu.count {gpus}")
        m = profile.models[shape.name]
        super().__init__(shape, layer_copy_overhead_s=m.preload_layer_overhead_ms * MS,
                         layer_gate_s=m.preload_gate_layer_ms * MS, host_turn_s=m.host_turn_ms * MS,
                         host_next_turn_s=m.host_next_turn_ms * MS,
                         measured_contention=profile.ssd_contention, ssd_contention=ssd_contention,
                         hbm_kv_bytes=hbm_kv_bytes)
        self.gpus = gpus
        self.kv_shards = kv_shards(shape, gpus)
        self.profile = profile
        self.m = m
        self.decode_after_prefill = m.decode_after_prefill_ms
        self.decode_after_prefill_steps = m.decode_after_prefill_steps

    def prefill_layer_s(self, new: float, hist: float) -> float:
        if self.profile.prefill_padding is not None:
            new, hist = self.profile.prefill_padding.padded(math.ceil(new), math.ceil(hist))
        return self.m.prefill_layer_ms.time(new, hist) * MS

    def prefill_head_s(self, new: float) -> float:
        if self.profile.prefill_padding is not None:
            new = self.profile.prefill_padding.new_bucket(max(math.ceil(new), 1))
        return self.m.head_prefill_ms.time(new) * MS

    def decode_head_s(self, batch: int) -> float:
        return self.m.head_decode_ms.time(batch) * MS

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        if self.m.iteration is not None:   # the batched executor's measured step
            return self.m.iteration.step_ms((), batch, context_tokens) * MS
        per_seq = context_tokens / batch
        m = self.profile.decode_context_multiple
        if m is not None:
            # the graph's bucket of keys (gpu.decode_graph), at the batch's mean context: exact at batch 1
            per_seq = math.ceil(per_seq / m - 1e-9) * m
        layer = self.m.decode_layer_ms.time(batch, per_seq)
        return (self.shape.layers * layer + self.m.head_decode_ms.time(batch)) * MS

    def iteration(self, chunks, batch: int, context_tokens: float, load_layer_s: float = 0.0,
                  buffer_layers: int = 2, layerwise: bool = True) -> IterationCost:
        """With measured whole steps (`iteration` in the profile): the step's time is the table's,
        host work and LM heads included, spread evenly over the layers for the preload pipeline of
        history loads. Without: the composition of the per-layer tables (`CostModel.iteration`)."""
        it = self.m.iteration
        if it is None:
            return super().iteration(chunks, batch, context_tokens, load_layer_s, buffer_layers, layerwise)
        L = self.shape.layers
        compute = it.step_ms(chunks, batch, context_tokens) * MS / L
        if load_layer_s > 0.0 and layerwise:
            compute += self.layer_gate_s
        return IterationCost(preload_pipeline_s(L, load_layer_s, compute, buffer_layers, layerwise),
                             L * compute, L * load_layer_s, 0.0, 0.0, 0.0)

    def decode_next_kink(self, batch: int, context_tokens: float) -> float:
        it = self.m.iteration
        # a static-shape step (`StepPadding`) changes time only where its key changes; an unmeasured
        # one composes the tables, whose column kinks may come first
        last = (it.padding.decode_last_context(batch, context_tokens)
                if it is not None and it.keyed and it.padding is not None else math.inf)
        m = self.profile.decode_context_multiple
        if m is not None:
            # padded, the step is constant over each bucket: its last context is where the time changes
            return math.ceil(context_tokens / (batch * m) - 1e-9) * batch * m
        # bilinear in (batch, context per sequence): for a fixed batch, linear between the table's
        # interior context columns (the end segments extrapolate linearly)
        cols = (self.m.decode_layer_ms if it is None else it.decode_ms).ys
        i = bisect.bisect_right(cols, context_tokens / batch)
        while i < len(cols) - 1:
            if cols[i] * batch > context_tokens:
                return min(cols[i] * batch, last)
            i += 1
        return last

    def h2d_bw(self, chunk_bytes: float) -> float:
        k = self.kv_shards
        return k * self.profile.links["h2d_pinned"](chunk_bytes / k) * GB

    def d2h_bw(self, chunk_bytes: float) -> float:
        k = self.kv_shards
        return k * self.profile.links["d2h_pinned"](chunk_bytes / k) * GB

    def ssd_read_bw(self, chunk_bytes: float) -> float:
        return self.profile.ssd_read(chunk_bytes) * GB

    def ssd_write_bw(self, chunk_bytes: float) -> float:
        return self.profile.ssd_write(chunk_bytes) * GB


def build_cost_model(cfg) -> CostModel:
    """The back end a config asks for (its measured profile if it names one, else the roofline), with
    the SSD contention mode and the HBM left for KV (after weights and the reserved share:
    activations, allocator slack) resolved once."""
    shape = cfg.shape()
    g = cfg.gpu.spec()
    profile = load_profile(cfg.hardware_profile) if cfg.hardware_profile else None
    total = (profile.hbm_bytes if profile else g.hbm_bytes) * cfg.gpu.count
    ep = cfg.gpu.expert_parallel
    # expert parallelism: every GPU holds the non-expert weights whole and its share of the routed experts
    weights = cfg.gpu.count * shape.expert_parallel_weight_bytes(cfg.gpu.count) if ep else shape.weight_bytes
    hbm_kv = total * (1.0 - cfg.gpu.reserved_fraction) - weights
    shards = cfg.gpu.count if ep else kv_shards(shape, cfg.gpu.count)
    # replicated KV heads hold the same tokens several times: HBM for KV counts one copy
    kv_room = hbm_kv if shards == cfg.gpu.count else hbm_kv * shards / cfg.gpu.count
    kw = dict(ssd_contention=cfg.ssd.contention, hbm_kv_bytes=kv_room)
    if profile is not None:
        if ep:  # the config check refuses this first; a measured profile times tensor-parallel layers
            raise KvsimError(f"{cfg.source}: gpu.expert_parallel: a measured hardware profile times tensor-parallel "
                             "layers; expected no hardware_profile")
        cost = ProfileCost(shape, profile, cfg.gpu.count, **kw)
    elif ep:
        alltoall = (LinkAllToAll(g.nvlink_gbps, cfg.gpu.allreduce_latency_us * US)
                    if cfg.gpu.allreduce != "none" else None)
        cost = ExpertParallelCost(shape, cfg.gpu.count, g.peak_flops, g.hbm_bw_gbps, cfg.gpu.prefill_mfu,
                                  cfg.gpu.decode_mbu, cfg.host.h2d_gbps, cfg.host.d2h_gbps, cfg.ssd.read_gbps,
                                  cfg.ssd.write_gbps, alltoall=alltoall,
                                  efficiency=H100_EFFICIENCY if cfg.gpu.efficiency == "measured" else None,
                                  sms=g.sms, **kw)
    else:
        allreduce = None
        if cfg.gpu.allreduce == "ring":
            allreduce = RingAllReduce(g.nvlink_gbps, cfg.gpu.allreduce_latency_us * US)
        elif cfg.gpu.allreduce == "table":
            allreduce = load_allreduce_table(cfg.gpu.allreduce_table)
        cost = RooflineCost(shape, cfg.gpu.count, g.peak_flops, g.hbm_bw_gbps, cfg.gpu.prefill_mfu,
                            cfg.gpu.decode_mbu, cfg.host.h2d_gbps, cfg.host.d2h_gbps, cfg.ssd.read_gbps,
                            cfg.ssd.write_gbps, allreduce=allreduce,
                            efficiency=H100_EFFICIENCY if cfg.gpu.efficiency == "measured" else None,
                            sms=g.sms, **kw)
    if hbm_kv <= 0:
        raise KvsimError(f"{cfg.source}: gpu.count: {cfg.model} weights ({weights / GB:.0f} GB) "
                         f"leave no HBM for KV on {cfg.gpu.count} x {cfg.gpu.name}; expected more GPUs")
    return cost
