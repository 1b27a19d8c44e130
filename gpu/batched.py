"""A batched executor: the simulator's own chunked scheduler decides every step, the GPU runs it.

One scheduling code for both sides (issue 15): `sim.scheduler.ChunkedScheduler` (vLLM V1's step:
running requests first, chunked prefill under one token budget, recompute preemption, prefix caching
over `sim.blocks`' block pool) plans a step, this executor runs the plan as one forward pass over the
concatenated new tokens of every scheduled request (prefill chunks and decodes together), and the
simulator prices the same plan with `cost.iteration`. What the executor adds is what the scheduler
leaves to its caller:

* Paged KV in HBM, per layer a K and a V tensor `[num_blocks + 1, block_tokens, kv_heads, head_dim]`
  (block 0 is vLLM's null block: the scheduler hands out ids 1..num_blocks). A request's block table
  is the scheduler's block list (`block_table`); new tokens' K/V are written into their slots and
  attention reads each request's blocks (`ATTENTION_KINDS`: which kernel, measured on the GPU).
* History reuse: a prefix-cache hit costs nothing (its blocks are already in HBM); tokens an external
  host store supplies (`StepPlan.external`, the DRAM tier of attentionstore) are copied from pinned
  host memory into the request's blocks layer by layer on a side stream, one CUDA event per layer
  gating that layer's attention, the load of layer i waiting for the compute of layer i - N (a read
  buffer of N layers, CachedAttention §3.2, as `gpu.executor` does for one turn).
* Asynchronous save (§3.3): when a request finishes, its new full blocks are gathered on the main
  stream (before the scheduler can hand the freed blocks out again) and copied to the host on a
  side stream while the next steps run.
* The SSD tier (`gpu.batched_ssd`, `use_ssd`): the host store bypassed, sessions' KV saved to files by
  a writer thread and read back, per step with SSD hits, by a reader thread into pinned staging slots
  that the same layer-wise (or load-first) schedule copies into the blocks: SSD -> DRAM -> HBM.
* Preemption by recompute: the scheduler frees the blocks and rewinds the request; the executor
  simply runs what the next plans say (the request's tokens, its sampled outputs included, again).

* Steps as CUDA graphs (`gpu.batched_decode`): a step is padded to a batch bucket, a chunk-token
  bucket and a packed-key bucket (`sim.costmodel.StepPadding`, the rule the cost model prices) and
  replayed as one captured graph, so its time no longer follows how fast the host launches ~700
  kernels. Steps with a host load (or past the largest buckets) run eagerly; their host launch time is
  part of what is measured.
"""
from __future__ import annotations

import contextlib
import gc
import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from gpu.model import rms_norm, rope_tables, rotate_half
from gpu.tp_layer import ShardLayer, random_full_layer, rank_shape, shard
from sim.models import ModelShape
from sim.scheduler import ChunkedScheduler, SeqRequest, StepPlan

# sdpa: per request, gather its blocks to a contiguous K/V and run torch's SDPA (the reference, and
#   the only kind on CPU); flash_varlen: one gather of every request's context into a packed K/V and
#   one variable-length flash-attention call; flash_paged: flash attention reading the blocks in
#   place through a block table (where torch's flash kernel accepts one at this block size).
ATTENTION_KINDS = ("sdpa", "flash_varlen", "flash_paged")


def block_table(req) -> list[int]:
    """A request's KV block ids in token order. The one place the executor reads the scheduler's
    block list. Block ids exist in the exact pool only (the simulator's run pool keeps runs)."""
    blocks = req.blocks
    if blocks and not isinstance(blocks[0], int):
        raise TypeError("the executor needs block ids: build its scheduler with ChunkedConfig(pool='exact')")
    return list(blocks)


# ---- weights --------------------------------------------------------------------------------------

@dataclass
class BatchedModel:
    """Random bf16 weights of a real shape (GQA as Llama-3.1-8B): timing needs shapes, not training.
    Under tensor parallelism (`gpu.tp_batched`) `shape` and `layers` are one rank's shard and `reduce`
    the TP group's in-place all-reduce completing the attention output's and the MLP's partial sums."""
    shape: ModelShape
    layers: list[ShardLayer]
    embed: torch.Tensor       # [vocab, hidden]
    final_norm: torch.Tensor
    lm_head: torch.Tensor     # [vocab, hidden]
    rope_cos: torch.Tensor    # [max_pos, head_dim]
    rope_sin: torch.Tensor
    reduce: Optional[Callable[[torch.Tensor], object]] = None

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype


def random_model(shape: ModelShape, max_pos: int, device, dtype, seed: int = 0, rank: int = 0,
                 tp: int = 1) -> BatchedModel:
    """Fused QKV and gate/up per layer (one GEMM each), scaled by 1/sqrt(fan_in) so activations stay
    O(1) through the layers (NaN or inf would change kernel timings). With `tp` > 1: rank `rank`'s
    shard (`gpu.tp_layer.shard`) of the very weights `tp` = 1 draws, the embedding and LM head whole on
    every rank (as `gpu.tp_executor`: each rank computes every logit); its all-reduce is set by the caller."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = [shard(random_full_layer(shape, device, dtype, seed=seed * 1000 + i + 1), shape, rank, tp)
              for i in range(shape.layers)]
    cos, sin = rope_tables(shape, max_pos, device, dtype)

    def rand(rows, cols, fan_in):
        return (torch.randn((rows, cols), generator=gen, device=device, dtype=torch.float32)
                / math.sqrt(fan_in)).to(dtype)
    return BatchedModel(rank_shape(shape, tp), layers, rand(shape.vocab, shape.hidden, 1.0),
                        torch.ones(shape.hidden, device=device, dtype=dtype),
                        rand(shape.vocab, shape.hidden, shape.hidden), cos, sin)


def reference_logits(model: BatchedModel, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of `token_ids` computed in one pass with a contiguous KV (no blocks,
    no reuse): what every batched, paged, reused or resumed computation must equal."""
    s = model.shape
    H, K, D = s.heads, s.kv_heads, s.head_dim
    ids = torch.tensor(token_ids, device=model.device)
    T = len(token_ids)
    x = model.embed[ids]
    cos, sin = model.rope_cos[:T].view(T, 1, D), model.rope_sin[:T].view(T, 1, D)
    for w in model.layers:
        qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
        q = rotate_half(qkv[:, :H * D].view(T, H, D), cos, sin)
        k = rotate_half(qkv[:, H * D:(H + K) * D].view(T, K, D), cos, sin)
        v = qkv[:, (H + K) * D:].view(T, K, D)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True, enable_gqa=H != K)
        x = torch.addmm(x, o.transpose(0, 1).reshape(T, H * D), w.wo.T)
        g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
        x = torch.addmm(x, F.silu(g) * u, w.w2.T)
    return (rms_norm(x, model.final_norm) @ model.lm_head.T).float()


def residual_out(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, reduce=None) -> torch.Tensor:
    """x + a @ w.T, the residual add folded into the GEMM (beta = 1) on one GPU. Under tensor
    parallelism a @ w.T is this rank's partial sum (row-parallel O and down projections): all-reduced
    in place first, then added once (Megatron's split, `gpu.tp_layer`)."""
    if reduce is None:
        return torch.addmm(x, a, w.T)
    t = a @ w.T
    reduce(t)
    return x + t


# ---- one step's layout ----------------------------------------------------------------------------

@dataclass
class StepBatch:
    """Where each scheduled request's new tokens go and which KV each attends, for one forward."""
    reqs: list                # scheduled requests, in plan order
    starts: list[int]         # tokens with KV before the step (the chunk's cached context)
    counts: list[int]         # new tokens this step
    ids: torch.Tensor         # [T] token ids of the new tokens, requests concatenated
    positions: torch.Tensor   # [T]
    slots: torch.Tensor       # [T] flat KV slot (block * block_tokens + offset) of each new token
    last: torch.Tensor        # [R] row of each request's last new token (its logits)
    tables: list[torch.Tensor]  # per request: its block ids covering [0, start + count)
    cu_q: torch.Tensor | None = None     # [R + 1] int32 (flash kinds)
    cu_k: torch.Tensor | None = None
    kv_slots: torch.Tensor | None = None  # [sum of contexts] flat slots, every request's context
    table_pad: torch.Tensor | None = None  # [R, max blocks] int32 (flash_paged)
    ctx_lens: torch.Tensor | None = None   # [R] int32
    max_q: int = 0
    max_k: int = 0

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


# ---- the executor ---------------------------------------------------------------------------------

@dataclass
class StepResult:
    sampled: dict             # request -> token id it sampled this step
    logits: torch.Tensor | None   # [R, vocab] float32, when asked for (tests)
    gpu_ms: float             # step start -> sampled tokens ready (CUDA events; 0 on CPU)
    load_ms: float            # first layer's load start -> last layer's load end (0: no load)
    ext_tokens: int           # tokens copied in from the host store
    graph: bool = False       # run at a static shape (`gpu.batched_decode`: a CUDA graph on the GPU)
    key: tuple | None = None  # that shape (Bb, Nb, Kb)
    captured: bool = False    # its graph was captured by this step (a first use, not captured ahead)
    issued_ms: float = 0.0    # host time from `run`'s call until the step's GPU work was all issued (layout,
    #                           uploads, launches): where the GPU may wait on the host


class BatchedExecutor:
    """Runs `ChunkedScheduler` plans on `model` with a paged KV cache of `num_blocks` blocks.

    `host_blocks` > 0 gives a pinned host store of that many blocks (the DRAM tier): `save` writes a
    session's new full blocks there, `external_tokens` is what it can supply (the scheduler's
    `external_hit`), and a plan's `external` tokens are loaded from it layer by layer.
    `ssd_dir` (or `use_ssd`): the SSD tier instead, session files under that folder (DRAM bypassed:
    the host store, if any, is not used while the SSD tier is on); `take_io` says what it read and wrote.

    `decode_graphs`: steps without host loads at static shapes (`gpu.batched_decode.StaticStep`, pure
    decode and steps with prefill chunks alike, whatever `attention` is: its packed variable-length
    kernel is the one a graph can hold). None: on with CUDA (captured graphs), off on CPU; True on
    CPU: the same static body run eagerly (the tests').
    """

    def __init__(self, model: BatchedModel, num_blocks: int, block_tokens: int, attention: str = "sdpa",
                 host_blocks: int = 0, read_buffer_layers: int = 2, layerwise: bool = True,
                 poison: bool = False, kv: tuple | None = None, decode_graphs: bool | None = None,
                 ssd_dir=None, ssd_staging_blocks: int = 64):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {attention!r}, expected one of {ATTENTION_KINDS}")
        s = self.shape = model.shape
        self.model, self.bt, self.attention = model, block_tokens, attention
        self.L = s.layers
        self.dev = model.device
        self.cuda = self.dev.type == "cuda"
        self.N = read_buffer_layers
        self.layerwise = layerwise
        shp = (self.L, num_blocks + 1, block_tokens, s.kv_heads, s.head_dim)
        # NaN when poisoned: a read of a block the request does not own (or of a slot not yet
        # written) turns its logits to NaN
        fill = float("nan") if poison else 0.0
        if kv is not None:   # one cache shared by the executors of a call (allocated once)
            if tuple(kv[0].shape) != shp:
                raise ValueError(f"kv cache of shape {tuple(kv[0].shape)}, expected {shp}")
            self.k, self.v = kv
        else:
            self.k = torch.full(shp, fill, device=self.dev, dtype=model.dtype)
            self.v = torch.full(shp, fill, device=self.dev, dtype=model.dtype)
        self.tokens: dict = {}        # request -> token ids (prompt with its history, then outputs)
        self.session_of: dict = {}    # request -> session id (the host store's key)
        # host store: [L, host_blocks, bt, kv_heads, head_dim] K and V, pinned; per session a
        # contiguous range of blocks, filled from its start
        self.host_k = self.host_v = None
        if host_blocks:
            hshape = (self.L, host_blocks, block_tokens, s.kv_heads, s.head_dim)
            self.host_k, self.host_v = (_host_tensor(hshape, model.dtype, self.cuda) for _ in range(2))
        self.host_next = 0
        self.host_range: dict = {}    # session -> (first host block, capacity in blocks)
        self.host_saved: dict = {}    # session -> whole blocks saved (their copy issued)
        self.host_ready: dict = {}    # session -> CUDA event of its last save's copy
        self.poison = poison
        self.ssd = None               # the SSD tier (`gpu.batched_ssd.SsdTier`), when on
        if ssd_dir is not None:
            self.use_ssd(ssd_dir, ssd_staging_blocks)
        if self.cuda:
            self.load_stream = torch.cuda.Stream()
            self.save_stream = torch.cuda.Stream()
            self.ev_start = torch.cuda.Event(enable_timing=True)
            self.ev_end = torch.cuda.Event(enable_timing=True)
            self.ev_load = [torch.cuda.Event(enable_timing=True) for _ in range(2 * self.L)]
            self.ev_comp = [torch.cuda.Event() for _ in range(self.L)]
        self.saves_in_flight: list = []
        if decode_graphs is None:
            decode_graphs = self.cuda
        self.static = None
        if decode_graphs:
            from gpu.batched_decode import StaticStep
            self.static = StaticStep(self, graphs=self.cuda)

    def reset(self) -> None:
        """Forget every request and session (a new run on the same KV and host buffers: a fresh
        scheduler has no cached block, so nothing stale in them is ever read)."""
        self.drain()
        self.tokens.clear()
        self.session_of.clear()
        self.host_next = 0
        self.host_range.clear()
        self.host_saved.clear()
        self.host_ready.clear()
        if self.ssd is not None:
            self.ssd.reset()   # its files removed: a new run starts with an empty SSD tier

    def use_ssd(self, root, staging_blocks: int = 64) -> None:
        """Serve the next sessions from the SSD tier, session files under `root` (None: back to the
        host store). `staging_blocks`: blocks per pinned staging slot at first (grown when a step
        loads more)."""
        if self.ssd is not None:
            self.ssd.close()
            self.ssd = None
        if root is not None:
            from gpu.batched_ssd import SsdTier
            s = self.shape
            self.ssd = SsdTier(root, self.L, self.bt, s.kv_heads, s.head_dim, self.model.dtype, self.dev, self.N,
                               self.poison, staging_blocks)

    @property
    def has_store(self) -> bool:
        """Whether finished turns are saved (and histories loaded back): a host store or the SSD tier."""
        return self.host_k is not None or self.ssd is not None

    def take_io(self) -> dict:
        """SSD bytes read and written since the last call (`gpu.batched_ssd.SsdTier.take_io`; empty
        without the SSD tier, whose step records keep their zeros)."""
        if self.ssd is None:
            return {}
        return self.ssd.take_io()

    # ---- requests and the host store -----------------------------------------------------------
    def add(self, req, token_ids: list[int], session=None) -> None:
        """Register a request's token ids (its prompt: history then new prompt) before it is scheduled."""
        if len(token_ids) != req.prompt_tokens:
            raise ValueError(f"request {req.id!r}: {len(token_ids)} token ids for {req.prompt_tokens} prompt tokens")
        self.tokens[req] = list(token_ids)
        self.session_of[req] = session

    def forget(self, req) -> list[int]:
        self.session_of.pop(req, None)
        return self.tokens.pop(req)

    def open_session(self, session, capacity_tokens: int) -> None:
        """Reserve a contiguous range of host blocks for a session's KV (the DRAM tier), or its file
        (the SSD tier)."""
        if self.ssd is not None:
            self.ssd.open_session(session, capacity_tokens)
            return
        n = -(-capacity_tokens // self.bt)
        if self.host_k is None or self.host_next + n > self.host_k.shape[1]:
            have = 0 if self.host_k is None else self.host_k.shape[1] - self.host_next
            raise ValueError(f"session {session!r}: {n} host blocks wanted, {have} left")
        self.host_range[session] = (self.host_next, n)
        self.host_saved[session] = 0
        self.host_next += n

    def external_tokens(self, req, hit_tokens: int) -> int:
        """The scheduler's `external_hit`: tokens of the request's session in the host store beyond
        its HBM hit (whole blocks; the scheduler keeps at least one token to compute)."""
        s = self.session_of.get(req)
        if self.ssd is not None:
            return self.ssd.external_tokens(s, hit_tokens) if s is not None else 0
        if s is None or s not in self.host_saved:
            return 0
        return max(self.host_saved[s] * self.bt - hit_tokens, 0)

    def save(self, req, blocks: list[int], computed_tokens: int) -> int:
        """Copy the session's new full blocks (those not saved by an earlier turn) to the host,
        asynchronously. `blocks` is the request's block table taken before the scheduler freed it.
        Returns the tokens saved."""
        s = self.session_of.get(req)
        if self.ssd is not None:
            return self._save_ssd(s, blocks, computed_tokens) if s is not None else 0
        if s is None or s not in self.host_range or self.host_k is None:
            return 0
        base, cap = self.host_range[s]
        a, b = self.host_saved[s], min(computed_tokens // self.bt, cap)
        if b <= a:
            return 0
        idx = torch.tensor(blocks[a:b], device=self.dev)
        # gathered on the main stream, so the freed blocks are read before a later step reuses them
        gk, gv = self.k.index_select(1, idx), self.v.index_select(1, idx)
        if self.cuda:
            self.save_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.save_stream):
                for li in range(self.L):
                    self.host_k[li, base + a:base + b].copy_(gk[li], non_blocking=True)
                    self.host_v[li, base + a:base + b].copy_(gv[li], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.save_stream)
            gk.record_stream(self.save_stream)
            gv.record_stream(self.save_stream)
            self.host_ready[s] = done
        else:
            self.host_k[:, base + a:base + b].copy_(gk)
            self.host_v[:, base + a:base + b].copy_(gv)
        self.host_saved[s] = b
        return (b - a) * self.bt

    def _save_ssd(self, s, blocks: list[int], computed_tokens: int) -> int:
        """`save` to the SSD tier: the new full blocks gathered (K and V of a block side by side, the
        file's layout) on the main stream, their write queued behind the writes before it."""
        a = self.ssd.saved.get(s)
        if a is None:
            return 0
        b = min(computed_tokens // self.bt, self.ssd.cap[s])
        if b <= a:
            return 0
        idx = torch.tensor(blocks[a:b], device=self.dev)
        kv = torch.stack((self.k.index_select(1, idx), self.v.index_select(1, idx)), dim=2)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream())
        return self.ssd.save(s, kv, a, ready)

    def drain(self) -> None:
        if self.ssd is not None:
            self.ssd.drain()
        if self.cuda:
            torch.cuda.synchronize()

    # ---- one step ------------------------------------------------------------------------------
    def layout(self, plan: StepPlan) -> StepBatch:
        """Token ids, positions, KV slots and attention metadata of a plan (host work, one upload)."""
        bt = self.bt
        reqs, starts, counts, ids, pos, slots, tables, last = [], [], [], [], [], [], [], []
        row = 0
        for r, n, _ in plan.scheduled:
            c = r.num_computed_tokens
            blocks = np.asarray(block_table(r), dtype=np.int64)
            p = np.arange(c, c + n)
            reqs.append(r)
            starts.append(c)
            counts.append(n)
            ids.append(self.tokens[r][c:c + n])
            pos.append(p)
            slots.append(blocks[p // bt] * bt + p % bt)
            tables.append(blocks[:-(-(c + n) // bt)])
            row += n
            last.append(row - 1)
        dev = self.dev
        flat_ids = [t for chunk in ids for t in chunk]
        # one host array, one upload
        host = np.concatenate([np.asarray(flat_ids, dtype=np.int64), np.concatenate(pos), np.concatenate(slots),
                               np.asarray(last, dtype=np.int64)])
        T, R = len(flat_ids), len(reqs)
        up = torch.from_numpy(host).to(dev, non_blocking=False)
        sb = StepBatch(reqs, starts, counts, up[:T], up[T:2 * T], up[2 * T:3 * T], up[3 * T:3 * T + R],
                       [torch.from_numpy(t).to(dev) for t in tables] if self.attention == "sdpa" else [])
        if self.attention != "sdpa":
            ctx = [c + n for c, n in zip(starts, counts)]
            sb.max_q, sb.max_k = max(counts), max(ctx)
            cu_q = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cu_k = np.concatenate([[0], np.cumsum(ctx)]).astype(np.int32)
            sb.cu_q = torch.from_numpy(cu_q).to(dev)
            sb.cu_k = torch.from_numpy(cu_k).to(dev)
            sb.ctx_lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
            if self.attention == "flash_varlen":
                kv = np.concatenate([(t[np.arange(k) // bt] * bt + np.arange(k) % bt) for t, k in zip(tables, ctx)])
                sb.kv_slots = torch.from_numpy(kv).to(dev)
            else:
                width = max(len(t) for t in tables)
                pad = np.zeros((R, width), dtype=np.int32)
                for i, t in enumerate(tables):
                    pad[i, :len(t)] = t
                sb.table_pad = torch.from_numpy(pad).to(dev)
        return sb

    def run(self, plan: StepPlan, keep_logits: bool = False) -> StepResult:
        """Run one planned step (call before `scheduler.update(plan)`: the plan's requests still hold
        their computed counts before the step). Returns the tokens sampled by the requests whose
        known tokens this step completes."""
        t_call = time.perf_counter()
        if not plan.scheduled:
            return StepResult({}, None, 0.0, 0.0, 0)
        loading = any(plan.external.values())
        # a step with host loads runs at its static shape when it loads first (every layer's copy, then
        # the compute); layer-wise loads gate each layer's compute on its own copy, which the eager
        # path below issues layer by layer
        if self.static is not None and (not loading or not self.layerwise):
            out = self._run_static(plan, keep_logits, t_call)
            if out is not None:
                return out
        m, s = self.model, self.shape
        sb = self.layout(plan)
        main = torch.cuda.current_stream() if self.cuda else None
        if self.cuda:
            self.ev_start.record(main)
        loads = self._loads(plan)
        ext_tokens = sum(n for _, _, n in loads)
        issue = self._issue_loads(loads, main) if loads else None
        gated = issue is not None
        if gated:
            # layers [0, N) load at once; layer i + N once layer i's compute is issued (its event
            # exists then), so the load stream can wait for it: the read buffer of N layers
            for li in range(self.N if self.layerwise else self.L):
                issue(li)
            if not self.layerwise:
                main.wait_event(self.ev_load[2 * self.L - 1])   # load first: all layers, then compute

        T = sb.tokens
        D = s.head_dim
        x = m.embed[sb.ids]
        cos = m.rope_cos[sb.positions].view(T, 1, D)
        sin = m.rope_sin[sb.positions].view(T, 1, D)
        H, K = s.heads, s.kv_heads
        for li, w in enumerate(m.layers):
            qkv = rms_norm(x, w.attn_norm) @ w.wqkv.T
            q = rotate_half(qkv[:, :H * D].view(T, H, D), cos, sin)
            k = rotate_half(qkv[:, H * D:(H + K) * D].view(T, K, D), cos, sin)
            v = qkv[:, (H + K) * D:].view(T, K, D)
            if gated:
                main.wait_event(self.ev_load[self.L + li])   # this layer's history has landed
            kc, vc = self.k[li], self.v[li]
            kc.view(-1, K, D).index_copy_(0, sb.slots, k)
            vc.view(-1, K, D).index_copy_(0, sb.slots, v)
            o = self._attend(q, kc, vc, sb)
            x = residual_out(x, o.reshape(T, H * D), w.wo, m.reduce)
            g, u = (rms_norm(x, w.mlp_norm) @ w.w13.T).chunk(2, dim=-1)
            x = residual_out(x, F.silu(g) * u, w.w2, m.reduce)
            if gated:
                self.ev_comp[li].record(main)
                if self.layerwise and li + self.N < self.L:
                    issue(li + self.N)
        # the LM head over every scheduled request's last new token, as vLLM computes logits for all
        # of them (a partial prefill's are discarded)
        logits = (rms_norm(x[sb.last], m.final_norm) @ m.lm_head.T).float()
        nxt = logits.argmax(-1)
        if self.cuda:
            self.ev_end.record(main)
        issued_ms = (time.perf_counter() - t_call) * 1e3
        toks = nxt.tolist()   # synchronises: the step is done, as vLLM's synchronous engine waits for it
        sampled = {}
        for r, c, n, t in zip(sb.reqs, sb.starts, sb.counts, toks):
            if c + n >= r.num_tokens:
                sampled[r] = t
                self.tokens[r].append(t)
        gpu_ms = self.ev_start.elapsed_time(self.ev_end) if self.cuda else 0.0
        load_ms = (self.ev_load[0].elapsed_time(self.ev_load[2 * self.L - 1])
                   if self.cuda and gated else 0.0)
        return StepResult(sampled, logits if keep_logits else None, gpu_ms, load_ms, ext_tokens, issued_ms=issued_ms)

    def _run_static(self, plan: StepPlan, keep_logits: bool, t_call: float) -> StepResult | None:
        """A step through `self.static` at its padded shape (None: no static shape, run eagerly)."""
        bt = self.bt
        decs, chunks, row_of = [], [], []
        for r, n, dec in plan.scheduled:
            if dec:
                row_of.append(("d", len(decs)))
                decs.append(r)
            else:
                row_of.append(("c", len(chunks)))
                chunks.append((r, n))
        ctxs = [r.num_computed_tokens + 1 for r in decs]
        shape = [(n, r.num_computed_tokens) for r, n in chunks]
        key = self.static.key(ctxs, shape)
        if key is None:
            return None
        ids = [self.tokens[r][c - 1] for r, c in zip(decs, ctxs)]
        tables = [block_table(r)[:-(-c // bt)] for r, c in zip(decs, ctxs)]
        chunk_ids = [self.tokens[r][h:h + n] for (r, _), (n, h) in zip(chunks, shape)]
        chunk_tables = [block_table(r)[:-(-(h + n) // bt)] for (r, _), (n, h) in zip(chunks, shape)]
        before = self.static.captured_in_run
        loads = self._loads(plan)
        main = torch.cuda.current_stream() if self.cuda else None
        if self.cuda:
            self.ev_start.record()
        if loads:
            issue = self._issue_loads(loads, main)
            if issue is not None:
                for li in range(self.L):
                    issue(li)
                main.wait_event(self.ev_load[2 * self.L - 1])   # load first: all layers, then compute
        self.static.run(key, ids, ctxs, tables, chunk_ids, shape, chunk_tables)
        if self.cuda:
            self.ev_end.record()
        issued_ms = (time.perf_counter() - t_call) * 1e3
        Bb = key[0]
        rows = [i if kind == "d" else Bb + i for kind, i in row_of]
        toks = self.static.next[:Bb + len(chunks)].tolist()   # synchronises, as the eager path does
        sampled = {}
        for (r, n, _), row in zip(plan.scheduled, rows):
            if r.num_computed_tokens + n >= r.num_tokens:
                sampled[r] = toks[row]
                self.tokens[r].append(toks[row])
        gpu_ms = self.ev_start.elapsed_time(self.ev_end) if self.cuda else 0.0
        load_ms = (self.ev_load[0].elapsed_time(self.ev_load[2 * self.L - 1])
                   if self.cuda and loads else 0.0)
        logits = self.static.logits[rows].clone() if keep_logits else None
        return StepResult(sampled, logits, gpu_ms, load_ms, sum(n for _, _, n in loads), graph=True, key=key,
                          captured=self.static.captured_in_run > before, issued_ms=issued_ms)

    # ---- attention over the blocks ---------------------------------------------------------------
    def _attend(self, q, kc, vc, sb: StepBatch) -> torch.Tensor:
        if self.attention == "sdpa":
            return attend_sdpa(q, kc, vc, sb)
        if self.attention == "flash_varlen":
            K, D = kc.shape[-2:]
            keys = kc.view(-1, K, D).index_select(0, sb.kv_slots)
            vals = vc.view(-1, K, D).index_select(0, sb.kv_slots)
            return varlen_attention(q, keys, vals, sb.cu_q, sb.cu_k, sb.max_q, sb.max_k)
        return paged_flash_attention(q, kc, vc, sb)

    # ---- layer-wise preload of external (host) tokens ---------------------------------------------
    def _loads(self, plan: StepPlan):
        """(request, first block, blocks) of each admitted request's host-supplied tokens."""
        out = []
        for r, n in plan.external.items():
            if n:
                hit = plan.admitted.get(r, 0)
                out.append((r, hit // self.bt, n))
        return out

    def _issue_loads(self, loads, main):
        """Copy host blocks into the requests' blocks, layer by layer. On CPU: every layer now, returns
        None. On CUDA: returns `issue(li)`, which puts layer li's copies on the load stream (waiting for
        layer li - N's compute: slot li % N of the staging buffer is reused) and records its events."""
        if self.ssd is not None:
            return self._issue_ssd_loads(loads, main)
        bt = self.bt
        dst, srcs = [], []
        for r, j0, n in loads:
            nb = n // bt
            s = self.session_of[r]
            base, _ = self.host_range[s]
            dst += block_table(r)[j0:j0 + nb]
            srcs.append((base + j0, nb, s))
        idx = torch.tensor(dst, device=self.dev)
        total = len(dst)
        if not self.cuda:
            for li in range(self.L):
                hk = torch.cat([self.host_k[li, a:a + nb] for a, nb, _ in srcs])
                hv = torch.cat([self.host_v[li, a:a + nb] for a, nb, _ in srcs])
                self.k[li].index_copy_(0, idx, hk)
                self.v[li].index_copy_(0, idx, hv)
            return None
        ls, N = self.load_stream, self.N
        ls.wait_stream(main)   # blocks written by earlier steps (and their save gathers) are done
        for _, _, s in srcs:
            ev = self.host_ready.get(s)
            if ev is not None:
                ls.wait_event(ev)   # the session's last save must have landed before it is read back
        shp = (N, total) + tuple(self.k.shape[2:])
        with torch.cuda.stream(ls):
            stage_k = torch.empty(shp, device=self.dev, dtype=self.k.dtype)
            stage_v = torch.empty(shp, device=self.dev, dtype=self.k.dtype)

        def issue(li):
            slot = li % N
            with torch.cuda.stream(ls):
                if self.layerwise and li >= N:
                    ls.wait_event(self.ev_comp[li - N])
                self.ev_load[li].record(ls)
                off = 0
                for a, nb, _ in srcs:
                    stage_k[slot, off:off + nb].copy_(self.host_k[li, a:a + nb], non_blocking=True)
                    stage_v[slot, off:off + nb].copy_(self.host_v[li, a:a + nb], non_blocking=True)
                    off += nb
                self.k[li].index_copy_(0, idx, stage_k[slot])
                self.v[li].index_copy_(0, idx, stage_v[slot])
                self.ev_load[self.L + li].record(ls)
        return issue

    def _issue_ssd_loads(self, loads, main):
        """`_issue_loads` from the SSD tier (`gpu.batched_ssd.SsdTier.start_load`): the same `issue(li)`
        on CUDA; on CPU every layer read and copied now (through the same staging slots), None."""
        bt = self.bt
        dst, srcs = [], []
        for r, j0, n in loads:
            nb = n // bt
            dst += block_table(r)[j0:j0 + nb]
            srcs.append((self.session_of[r], j0, nb))
        idx = torch.tensor(dst, device=self.dev)
        issue = self.ssd.start_load(srcs, idx, self.k, self.v, getattr(self, "ev_load", None),
                                    getattr(self, "ev_comp", None), getattr(self, "load_stream", None),
                                    self.layerwise, main)
        if self.cuda:
            return issue
        for li in range(self.L):
            issue(li)
        self.ssd.join()
        return None


def _host_tensor(shape, dtype, pinned: bool) -> torch.Tensor:
    """Page-locked host memory of exactly the size asked (torch's pinned allocator rounds up to a
    power of two, which would double a large store): `gpu.kvstore`'s mmap + cudaHostRegister."""
    from gpu.kvstore import aligned_host_bytes
    n = math.prod(shape) * dtype.itemsize
    raw = aligned_host_bytes(n, pinned)
    return raw[:n].view(dtype).view(shape)


def attend_sdpa(q, kc, vc, sb: StepBatch) -> torch.Tensor:
    """Per request: its blocks gathered to a contiguous K/V, torch's SDPA with the causal mask
    aligned bottom-right (a new token sees the whole cached context and the new tokens before it)."""
    T, H, D = q.shape
    K = kc.shape[-2]
    out = torch.empty_like(q)
    row = 0
    for c, n, table in zip(sb.starts, sb.counts, sb.tables):
        ctx = c + n
        keys = kc.index_select(0, table).view(-1, K, D)[:ctx].transpose(0, 1)
        vals = vc.index_select(0, table).view(-1, K, D)[:ctx].transpose(0, 1)
        qh = q[row:row + n].transpose(0, 1)
        mask = None if n == 1 else causal_lower_right(n, ctx)
        o = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=mask, enable_gqa=H != K)
        out[row:row + n] = o.transpose(0, 1)
        row += n
    return out


def varlen_attention(q, keys, vals, cu_q, cu_k, max_q: int, max_k: int) -> torch.Tensor:
    """Variable-length causal attention over packed sequences (flash attention on CUDA; causal is
    bottom-right aligned there, as flash-attn >= 2.1). On CPU, the same function per sequence."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(q, keys, vals, cu_q, cu_k, max_q, max_k, 0.0, True,
                                                       False)[0]
    H, K = q.shape[1], keys.shape[1]
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        n, ctx = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if n == 0:   # an empty sequence (a static step's unused chunk slot)
            continue
        mask = None if n == 1 else causal_lower_right(n, ctx)
        o = F.scaled_dot_product_attention(q[cq[i]:cq[i + 1]].transpose(0, 1), keys[ck[i]:ck[i + 1]].transpose(0, 1),
                                           vals[ck[i]:ck[i + 1]].transpose(0, 1), attn_mask=mask, enable_gqa=H != K)
        out[cq[i]:cq[i + 1]] = o.transpose(0, 1)
    return out


def paged_flash_attention(q, kc, vc, sb: StepBatch) -> torch.Tensor:
    """Flash attention reading the blocks in place through a block table (torch's flash kernel names
    the argument `block_table` in newer releases; it may reject small blocks: the GPU script's
    micro-benchmark reports that and keeps another kind)."""
    return torch.ops.aten._flash_attention_forward(q, kc, vc, sb.cu_q, None, sb.max_q, sb.max_k, 0.0, True, False,
                                                   seqused_k=sb.ctx_lens, block_table=sb.table_pad)[0]


# ---- serving a trace on a clock ---------------------------------------------------------------------

@dataclass
class StepRecord:
    """One step as run: the plan's shape (what the cost model prices) and what it measured."""
    step: int
    start_s: float            # executor clock at schedule()
    end_s: float              # executor clock when the sampled tokens were on the host
    host_ms: float            # schedule() and the step's layout, before the GPU work was issued
    wall_ms: float
    gpu_ms: float
    load_ms: float
    decodes: int              # B: decoding requests
    decode_ctx: int           # their tokens (prompt + output so far), as the engine counts them
    chunks: str               # "new:cached;..." of the prefill chunks
    chunk_tokens: int
    ext: str                  # "tokens;..." supplied by the host store, per admitted request
    ext_tokens: int
    admitted: int
    preempted: int
    finished: int
    free_blocks: int
    graph: bool = False       # a step run at a static shape (a CUDA graph on the GPU)
    key: str = ""             # that shape, "Bb:Nb:Kb" (`sim.costmodel.StepPadding`)
    captured: bool = False    # the step captured its graph (first use): its time includes the capture
    loop_ms: float = 0.0      # the serving loop's host time around the step (schedule, update, records),
    #                           host clock: what a replay on a simulated clock measures of the loop
    decode_max_ctx: int = 0   # the longest decoding request's tokens (the attention kernel waits for it)
    gc_ms: float = 0.0        # Python's garbage collections during the step (host clock), inside wall_ms
    run_ms: float = 0.0       # host time of the executor's `run` (issue, wait for the sampled tokens, read them)
    issued_ms: float = 0.0    # of which until the step's GPU work was all issued (`StepResult.issued_ms`)
    # the SSD tier (`BatchedExecutor.take_io`): what the step's loads read (bytes, tokens; host-clock span
    # from the first read's start to the last read's end, of which waiting for a session's write to land),
    # and what the saves after it queued to be written
    ssd_read_bytes: int = 0
    ssd_read_tokens: int = 0
    ssd_read_ms: float = 0.0
    ssd_wait_ms: float = 0.0
    ssd_write_bytes: int = 0
    ssd_write_tokens: int = 0


@dataclass
class TurnRecord:
    session_id: str
    turn: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int        # history + new prompt (the request's input)
    new_prompt_tokens: int
    output_tokens: int
    hit_tokens: int           # HBM prefix hit at its first admission
    ext_tokens: int           # host-store tokens at its first admission
    preemptions: int
    saved_tokens: int = 0

    @property
    def ttft_s(self):
        return self.first_token_s - self.arrival_s


@dataclass
class ServeResult:
    turns: list[TurnRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    t0: float = 0.0           # the clock's reading at time 0 of the records (to align outside logs)


def _prompt_ids(sid: str, turn: int, n: int, vocab: int) -> list[int]:
    import zlib
    g = np.random.default_rng(zlib.crc32(f"{sid}/{turn}".encode()))
    return g.integers(0, vocab, n).tolist()


@contextlib.contextmanager
def _collections_timed():
    """Python's garbage collections timed while inside: yields [ms in all, start of the one running]."""
    gc_ms = [0.0, 0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_ms[1] = time.perf_counter()
        else:
            gc_ms[0] += (time.perf_counter() - gc_ms[1]) * 1e3
    gc.callbacks.append(on_gc)
    try:
        yield gc_ms
    finally:
        gc.callbacks.remove(on_gc)


def serve_sessions(ex: BatchedExecutor, sched: ChunkedScheduler, sessions: dict, *, clock=time.perf_counter,
                   sleep=time.sleep, on_step=None, max_steps: int | None = None,
                   stop_s: float = math.inf) -> ServeResult:
    """Serve multi-turn sessions in real time with `sched` deciding every step and `ex` running it.

    `sessions`: session id -> list of turns `(arrival_s or nan, think_s, prompt_tokens, output_tokens)`
    (the canonical trace's columns): turn 0 arrives at its arrival time on the executor's clock, a
    later turn `think_s` after the previous turn's reply ended (or at its own arrival time if given).
    A turn's request carries the session's tokens so far (prompts and replies) and its new prompt, its
    blocks keyed `(session, i)` (the tokens of block i of a session are always the same), so a later
    turn hits its history in HBM (prefix caching) or in the host store (`ex.external_tokens`).
    Everything before the clock starts: prompt ids drawn. Returns per-turn and per-step records;
    at `stop_s` on its clock (or after `max_steps`) it stops, and turns not finished are left out.
    """
    vocab = ex.shape.vocab
    pending = []  # (arrival, sid, turn)
    hist: dict = {sid: [] for sid in sessions}
    ids = {(sid, k): _prompt_ids(sid, k, int(t[2]), vocab) for sid, ts in sessions.items() for k, t in enumerate(ts)}
    for sid, ts in sessions.items():
        if ex.has_store:
            ex.open_session(sid, sum(int(t[2]) + int(t[3]) for t in ts) + ex.bt)
        pending.append((float(ts[0][0]), sid, 0))
    heapq.heapify(pending)
    res = ServeResult()
    rec_of: dict = {}   # request -> TurnRecord
    # the collector's policy is the caller's (the validation freezes the heap and collects only when idle);
    # collections that still run inside a step are timed (`gc_ms`): host time the cost model does not price
    with _collections_timed() as gc_ms:
        t0 = res.t0 = clock()
        step = 0
        while pending or sched.has_unfinished():
            now = clock() - t0
            while pending and pending[0][0] <= now:
                arr, sid, k = heapq.heappop(pending)
                _, _, p, o = sessions[sid][k]
                toks = hist[sid] + ids[(sid, k)]
                req = SeqRequest((sid, k), len(toks), int(o), (lambda i, s=sid: (s, i)))
                ex.add(req, toks, session=sid)
                rec_of[req] = TurnRecord(sid, k, arr, math.nan, math.nan, len(toks), int(p), int(o), -1, 0, 0)
                sched.add_request(req)
            if not sched.has_unfinished():
                if pending:
                    wait = pending[0][0] - (clock() - t0)
                    if wait > 0:
                        sleep(wait)
                continue
            t_start = clock() - t0
            h0 = time.perf_counter()   # the loop's own host time, on the host clock whatever `clock` is
            gc0 = gc_ms[0]
            plan = sched.schedule()
            if not plan.scheduled:
                if not sched.running:
                    head = sched.waiting[0]
                    raise RuntimeError(f"request {head.id}: {head.num_tokens} tokens never fit the {sched.cfg.num_blocks} "
                                       f"KV blocks")
                sched.update(plan)
                continue
            tables = {r: block_table(r) for r, _, _ in plan.scheduled}
            # the step's shape as the simulator's ChunkedReplica.serve prices it (before update)
            chunks, B, ctx, ctx_max = [], 0, 0, 0
            for r, n, dec in plan.scheduled:
                if dec:
                    B += 1
                    c = r.prompt_tokens + r.num_output_tokens
                    ctx += c
                    ctx_max = max(ctx_max, c)
                else:
                    chunks.append((n, r.num_computed_tokens))
            host_ms = (clock() - t0 - t_start) * 1e3
            h1 = time.perf_counter()
            out = ex.run(plan)
            h2 = time.perf_counter()
            finished = sched.update(plan)
            t_end = clock() - t0
            for r, hit in plan.admitted.items():
                tr = rec_of[r]
                if tr.hit_tokens < 0:
                    tr.hit_tokens, tr.ext_tokens = hit, plan.external.get(r, 0)
            for r in plan.preempted:
                rec_of[r].preemptions += 1
            for r in out.sampled:
                tr = rec_of[r]
                if math.isnan(tr.first_token_s):
                    tr.first_token_s = t_end
            for r in finished:
                tr = rec_of.pop(r)
                tr.finish_s = t_end
                tr.saved_tokens = ex.save(r, tables[r], r.num_computed_tokens) if ex.has_store else 0
                hist[tr.session_id] = _session_tokens(ex, r)
                res.turns.append(tr)
                nxt = tr.turn + 1
                ts = sessions[tr.session_id]
                if nxt < len(ts):
                    arr, think = ts[nxt][0], ts[nxt][1]
                    heapq.heappush(pending, (float(arr) if not math.isnan(arr) else t_end + float(think),
                                             tr.session_id, nxt))
            loop_ms = (h1 - h0 + time.perf_counter() - h2) * 1e3
            res.steps.append(StepRecord(
                step, t_start, t_end, host_ms, (t_end - t_start) * 1e3, out.gpu_ms, out.load_ms, B, ctx,
                ";".join(f"{n}:{h}" for n, h in chunks), sum(n for n, _ in chunks),
                ";".join(str(plan.external[r]) for r in plan.external), out.ext_tokens, len(plan.admitted),
                len(plan.preempted), len(finished), plan.free_blocks, out.graph,
                ":".join(map(str, out.key)) if out.key else "", out.captured, loop_ms, ctx_max, gc_ms[0] - gc0,
                (h2 - h1) * 1e3, out.issued_ms,
                **ex.take_io()))
            if on_step is not None:
                on_step(res.steps[-1])
            step += 1
            if (max_steps is not None and step >= max_steps) or t_end >= stop_s:
                break
        ex.drain()
        return res


def _session_tokens(ex: BatchedExecutor, req) -> list[int]:
    """A finished request's tokens: its input and every sampled token (the last one's KV is computed
    by the session's next turn, as part of its prompt)."""
    return ex.forget(req)
