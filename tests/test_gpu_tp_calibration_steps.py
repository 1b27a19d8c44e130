"""The TP calibration's per-layer tables from samples timed as the executor runs (gpu.bench):
whole decode steps back to back, prefill samples of several passes over the layer stack.

The reductions with hand-computed numbers; the grids themselves on 2 gloo processes with a tiny GQA
shard (the device call's code path, CPU clock), their rows checked against their own raw samples.
"""
import os
import socket
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpu import bench
from gpu import model as M
from gpu.tp_executor import slowest_rank


def test_decode_layer_is_the_step_less_the_head_over_the_layers():
    # medians: step 20.2 ms, head 0.81 ms; 80 layers -> (20.2 - 0.81) / 80 = 0.242375 ms a layer
    ms = bench.decode_layer_from_steps([20.0, 20.4, 20.2], [0.80, 0.82, 0.81], 80)
    assert ms == pytest.approx(0.242375)
    # so that layers x table + head gives the measured step back
    assert 80 * ms + 0.81 == pytest.approx(20.2)


def test_prefill_samples_of_several_passes_divide_by_every_layer_run():
    # 8-layer stack replayed 10 times: 80 layers a sample; median 24.0 ms -> 0.3 ms a layer
    assert bench.per_layer_ms([23.0, 24.0, 26.0], 8 * 10) == pytest.approx(0.3)
    assert bench.per_layer_ms([2.4], 8) == pytest.approx(0.3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = M.shard_shape(M.TINY_GQA, world)

        def reduce(t):
            dist.all_reduce(t)
        align_calls = []

        def align():
            align_calls.append(1)
            dist.all_reduce(torch.ones(1))
        model = M.random_decoder(shard, 600, "cpu", torch.float32, seed=2, reduce=reduce, rank=rank)
        dec = bench.decode_step_grid(model, [1], [256, 512], steps=5, reps=(1, 3), align=align)
        n_dec = len(align_calls)
        pre = bench.prefill_layer_grid(shard, [16], [0, 32], device="cpu", reduce=reduce, align=align,
                                       passes=3, reps=(1, 2))
        out[rank] = {"decode": dec, "prefill": pre, "aligns": (n_dec, len(align_calls) - n_dec),
                     "layers": len(model.layers)}
    finally:
        dist.destroy_process_group()


def test_grids_on_two_gloo_ranks_reduce_their_own_samples():
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, _port(), out), nprocs=2, join=True)
    parts = [out[0], out[1]]
    L = parts[0]["layers"]
    assert L == M.TINY_GQA.layers == 4
    for p in parts:
        # decode: 2 contexts x (all layers, head alone) x (1 warm-up + 3 samples), one alignment each
        # prefill: 2 history points x (1 + 2) samples
        assert p["aligns"] == (2 * 2 * 4, 2 * 3)
        for r in p["decode"]["rows"]:
            assert r["steps"] == 5 and len(r["step_ms"]) == 3 and len(r["head_step_ms"]) == 3
            assert r["ms"] == pytest.approx((statistics.median(r["step_ms"]) - statistics.median(r["head_step_ms"])) / L)
        assert [h["batch"] for h in p["decode"]["head"]] == [1]
        assert len(p["decode"]["head"][0]["samples_ms"]) == 6       # both contexts' head samples
        for r in p["prefill"]["rows"]:
            assert r["passes"] == 3 and len(r["stack_ms"]) == 2
            assert r["ms"] == pytest.approx(statistics.median(r["stack_ms"]) / (bench.STACK * 3))
    # the profile keeps, per point, the slowest rank's figure
    got = slowest_rank(parts, "decode", ("batch", "context_tokens"))
    for i, row in enumerate(got["rows"]):
        assert row["ms"] == max(p["decode"]["rows"][i]["ms"] for p in parts)
