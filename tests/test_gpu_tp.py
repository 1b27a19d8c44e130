"""Tensor-parallel measurement (gpu/tp_layer.py, gpu/tp_bench.py, bench/gpu_tp_run.py) on CPU.

The device run's arithmetic (sizes, bus bandwidth, the table, the GEMM roofline) is checked against
hand-computed numbers; the sharded layer against the unsharded one; the script end to end on 2 gloo
processes with tiny shapes (--smoke).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpu import model as M
from gpu import tp_bench as B
from gpu import tp_layer as T

ROOT = Path(__file__).resolve().parents[1]


def test_allreduce_sizes_cover_decode_and_prefill_messages():
    sizes = B.allreduce_sizes()
    assert sizes == sorted(set(sizes))
    assert sizes[0] == 8 * 1024 and sizes[-1] == 256 * 2**20
    # 2^13..2^28 and 1.5x each but the last: 16 + 15
    assert len(sizes) == 31
    for batch in (1, 8, 32, 64, 128, 256):          # a decode step's [batch, 8192] bf16
        assert batch * 8192 * 2 in sizes
    assert 8192 * 8192 * 2 in sizes                  # a prefill chunk of 8192 tokens: 128 MiB
    # a real message off the grid is added: batch 5 -> 80 KiB, neither a power of two nor 1.5x one
    assert 5 * 8192 * 2 not in sizes
    assert 5 * 8192 * 2 in B.allreduce_sizes(decode_batches=(5,), prefill_tokens=())


def test_bus_bandwidth_matches_nccl_tests_formula():
    alg, bus = B.bus_bandwidth_gbps(1e9, 1e-2, 4)    # 1 GB in 10 ms over 4 ranks
    assert alg == pytest.approx(100.0)
    assert bus == pytest.approx(150.0)                # x 2 (4 - 1) / 4
    assert B.bus_bandwidth_gbps(1e9, 1e-2, 2)[1] == pytest.approx(100.0)


def test_allreduce_table_takes_slowest_rank_and_graph_time_where_measured():
    rows = []
    for rank, us in ((0, 10.0), (1, 12.0)):
        rows += [{"tp": 2, "bytes": 16384, "mode": "eager", "rank": rank, "us_median": us + 5, "us_p10": us,
                  "us_p90": us + 9, "ops": 20, "samples": 3},
                 {"tp": 2, "bytes": 16384, "mode": "graph", "rank": rank, "us_median": us, "us_p10": us,
                  "us_p90": us, "ops": 20, "samples": 3},
                 {"tp": 2, "bytes": 8192, "mode": "eager", "rank": rank, "us_median": us, "us_p10": us,
                  "us_p90": us, "ops": 20, "samples": 3}]
    comb = B.combine_allreduce(rows)
    graph16 = [c for c in comb if c["bytes"] == 16384 and c["mode"] == "graph"][0]
    assert graph16["us"] == 12.0 and graph16["us_fastest_rank"] == 10.0
    assert graph16["busbw_gbps"] == pytest.approx(16384 / 12e-6 / 1e9)   # tp 2: busbw = algbw
    doc = B.allreduce_table(comb, "H100", "2026-01-01T00:00:00+00:00", "cmd")
    assert doc == {"schema": "kvsim-allreduce-table/1", "device": "H100", "measured_at": "2026-01-01T00:00:00+00:00",
                   "command": "cmd", "tp": {2: {"bytes": [8192, 16384], "us": [12.0, 12.0]}}}
    assert yaml.safe_load(yaml.safe_dump(doc))["tp"][2]["us"] == [12.0, 12.0]


def test_llama31_70b_shard_matrices_per_tp_degree():
    assert B.layer_matrices(T.LLAMA31_70B, 4) == [("qkv", (64 + 16) * 128 // 4, 8192), ("o", 8192, 2048),
                                                  ("gate_up", 14336, 8192), ("down", 8192, 7168)]
    assert B.layer_matrices(T.LLAMA31_70B, 2)[0] == ("qkv", 5120, 8192)
    with pytest.raises(ValueError, match="kv_heads 8 does not split over tp=16"):
        B.layer_matrices(T.LLAMA31_70B, 16)


def test_gemm_row_counts_flops_bytes_and_roofline():
    row = B.gemm_row(2, 3, 4, ms=1.0, peak_flops=1e6, hbm_bytes_s=1e5, mfu=0.5, mbu=0.5)
    assert row["flops"] == 48.0                      # 2 * 2 * 3 * 4
    assert row["bytes"] == 52.0                      # 2 * (2*4 + 3*4 + 2*3)
    assert row["frac_peak_flops"] == pytest.approx(48 / 1e-3 / 1e6)
    assert row["bound"] == "memory"                  # 52 / 1e5 s > 48 / 1e6 s
    assert row["roofline_ms"] == pytest.approx(52 / (1e5 * 0.5) * 1e3)    # 1.04 ms
    assert row["measured_over_roofline"] == pytest.approx(1.0 / 1.04)


def _attention_summed_over_shards(full, shape, tp, x, cache, start, cos, sin):
    return sum(T.attention_partial(T.shard(full, shape, r, tp), x, T.shard_kv(cache, r, tp), start, cos, sin)
               for r in range(tp))


@pytest.mark.parametrize("tp", [2, 4])
def test_shards_partial_sums_equal_unsharded_layer_blocks(tp):
    shape = T.TINY_GQA
    full = T.random_full_layer(shape, "cpu", torch.float64, seed=4)
    one = T.shard(full, shape, 0, 1)
    cos, sin = M.rope_tables(shape, 64, "cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    for start, n in ((9, 1), (0, 5), (7, 3)):
        x = torch.randn((2, n, shape.hidden), generator=g, dtype=torch.float64)
        cache = torch.randn((2, 32, 2, shape.kv_heads, shape.head_dim), generator=g, dtype=torch.float64)
        c, s = cos[start:start + n], sin[start:start + n]
        ref = T.attention_partial(one, x, cache.clone(), start, c, s)
        got = _attention_summed_over_shards(full, shape, tp, x, cache, start, c, s)
        torch.testing.assert_close(got, ref)
        mlp = sum(T.mlp_partial(T.shard(full, shape, r, tp), x) for r in range(tp))
        torch.testing.assert_close(mlp, T.mlp_partial(one, x))
    # a shard alone is not the layer: the check above would fail without the sum over ranks
    assert not torch.allclose(T.mlp_partial(T.shard(full, shape, 0, tp), x), T.mlp_partial(one, x))


def test_shard_writes_only_its_kv_heads_into_its_cache():
    shape = T.TINY_GQA
    full = T.random_full_layer(shape, "cpu", torch.float32, seed=2)
    cos, sin = M.rope_tables(shape, 16, "cpu", torch.float32)
    x = torch.randn(1, 3, shape.hidden)
    ref_cache = torch.randn(1, 8, 2, shape.kv_heads, shape.head_dim)
    T.attention_partial(T.shard(full, shape, 0, 1), x, ref_cache, 2, cos[2:5], sin[2:5])
    part = T.shard_kv(torch.zeros_like(ref_cache), 1, 2)
    T.attention_partial(T.shard(full, shape, 1, 2), x, part, 2, cos[2:5], sin[2:5])
    torch.testing.assert_close(part[:, 2:5], ref_cache[:, 2:5, :, 2:4])


def test_combine_host_links_aggregates_concurrent_ranks():
    rows = [{"gpus": 2, "direction": "h2d", "trial": 0, "rank": 0, "bytes": 10e9, "t0": 0.0, "t1": 0.5, "gbps": 20.0},
            {"gpus": 2, "direction": "h2d", "trial": 0, "rank": 1, "bytes": 10e9, "t0": 0.1, "t1": 1.0, "gbps": 10e9 / 0.9e9}]
    (row,) = B.combine_host_links(rows)
    assert row["aggregate_gbps"] == pytest.approx(20.0)       # 20 GB from t=0 to t=1
    assert row["per_gpu_min_gbps"] == pytest.approx(10 / 0.9) and row["per_gpu_max_gbps"] == 20.0


def test_smoke_run_writes_each_stage_file(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_tp_run.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = yaml.safe_load((out / "allreduce.yaml").read_text())
    assert doc["schema"] == "kvsim-allreduce-table/1" and "--smoke" in doc["command"]
    assert "NCCL_NVLS_ENABLE=0" in doc["command"]
    assert doc["tp"][2]["bytes"] == [1024, 4096, 16384] and all(u > 0 for u in doc["tp"][2]["us"])
    import csv
    layer = list(csv.DictReader(open(out / "tp_layer.csv")))
    assert {(r["tp"], r["comm"]) for r in layer} == {("1", "False"), ("2", "False"), ("2", "True")}
    assert (out / "gemm.csv").exists()
    import json
    assert json.loads((out / "env.json").read_text())["tp_check"]["passed"] is True


def test_bad_stage_name_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_tp_run.py", "--smoke", "--out", str(tmp_path),
                           "--stages", "check,bogus"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--stages: 'bogus'" in proc.stderr
