"""What one rank of the CPU TP-batched tests runs (tests/test_tp_batched.py spawns two of them over gloo):
importable by the spawned processes, the same scenario helpers usable in the test's own process."""
import datetime as dt
import os
import traceback

import torch
import torch.distributed as dist

from gpu.batched import BatchedExecutor, random_model, serve_sessions
from gpu.tp_batched import GlooSync, RankDivergence, ShmSync, TPBatchedExecutor, all_reduce_sum, scripted_logits
from gpu.tp_layer import TINY_GQA
from sim.scheduler import ChunkedConfig, ChunkedScheduler

from tiny_batched import BT

# a GQA shape with one KV head: at TP 2 both ranks hold it (replicated)
ONE_KV = TINY_GQA.__class__("tiny-1kv", layers=2, hidden=64, heads=8, kv_heads=1, intermediate=96, vocab=101,
                            max_context_tokens=512)


def make_executor(shape, num_blocks, rank=0, tp=1, sync=None, **kw):
    model = random_model(shape, 512, "cpu", torch.float32, seed=3, rank=rank, tp=tp)
    if tp == 1:
        return BatchedExecutor(model, num_blocks, BT, poison=True, **kw)
    model.reduce = all_reduce_sum
    return TPBatchedExecutor(model, num_blocks, BT, sync, poison=True, **kw)


def sessions():
    """Three two-turn sessions arriving within 40 ms (a turn's reply 4-6 tokens, 5 ms think time)."""
    return {f"s{i}": [(0.02 * i, float("nan"), 11 + 5 * i, 4 + i), (float("nan"), 0.005, 6, 5)] for i in range(3)}


def served(ex, budget):
    sched = ChunkedScheduler(ChunkedConfig(pool="exact", num_blocks=ex.k.shape[1] - 1, max_num_batched_tokens=budget,
                                           block_tokens=BT, prefix_caching=True))
    res = serve_sessions(ex, sched, sessions(), clock=ex.sync.clock)
    return [(s.start_s, s.end_s, s.decodes, s.chunks, s.key) for s in res.steps], \
        sorted((t.session_id, t.turn, t.first_token_s, t.finish_s) for t in res.turns)


def worker(rank, world, port, shm_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=60))
        syncs = {"shm": ShmSync(shm_path, rank, world, timeout_s=60),
                 "gloo": GlooSync(dist.new_group(backend="gloo"), rank, world)}
        # the sharded logits, eager and at static shapes, GQA and replicated KV
        for shape in (TINY_GQA, ONE_KV):
            for graphs in (False, True):
                ex = make_executor(shape, 40, rank, world, syncs["shm"], decode_graphs=graphs)
                result[(shape.name, graphs)] = scripted_logits(ex)
                result[(shape.name, graphs, "kv_heads")] = ex.k.shape[3]
        # the same served steps on every rank, on rank 0's clock (each sync)
        for name, sync in syncs.items():
            ex = make_executor(TINY_GQA, 60, rank, world, sync, decode_graphs=True)
            result[("served", name)] = served(ex, 12)
        # a rank whose scheduler differs (token budget 12 on rank 0, 8 on rank 1) is caught before its step
        for name, sync in syncs.items():
            ex = make_executor(TINY_GQA, 60, rank, world, sync, decode_graphs=True)
            try:
                served(ex, 12 if rank == 0 else 8)
                result[("diverged", name)] = None
            except RankDivergence as exc:
                result[("diverged", name)] = (str(exc), ex.steps)
        dist.barrier()
        dist.destroy_process_group()
        syncs["shm"].close()
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
