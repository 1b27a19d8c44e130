"""The batched executor under tensor parallelism (gpu/tp_batched.py) on CPU: two gloo processes, each holding
its shard of a tiny GQA model (tests/tp_batched_ranks.py runs the ranks' side).

The sharded ranks' logits over prefill chunks, decodes and a prefix-cache hit equal one process's with the
unsharded weights (eager and static-shape bodies; GQA and a single replicated KV head); served sessions give
every rank the same steps at the same (rank 0's) times; a rank that plans otherwise is caught before its step."""
import json
import math
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from gpu.tp_batched import ShmSync, plan_digest, scripted_logits, tokens_digest
from gpu.tp_layer import TINY_GQA, kv_heads_per_rank, rank_shape

import tp_batched_ranks as R

dist = pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp
    from gpu.tp_bench import free_port
    out = tmp_path_factory.mktemp("tp_batched")
    shm = ShmSync.create(2)
    try:
        mp.spawn(R.worker, args=(2, free_port(), shm, str(out)), nprocs=2, join=True)
    except Exception as exc:   # noqa: BLE001 - a sandbox without sockets or process spawning
        pytest.skip(f"two gloo processes could not run here: {exc!r}"[:300])
    finally:
        os.unlink(shm)
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for g in got:
        assert "error" not in g, g["error"]
    return got


@pytest.mark.parametrize("shape", [TINY_GQA, R.ONE_KV], ids=["gqa", "one_kv_head"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_tp2_logits_equal_the_unsharded_executors_over_chunks_decodes_and_a_prefix_hit(ranks, shape, graphs):
    ref, ref_shapes, hit = scripted_logits(R.make_executor(shape, 40, decode_graphs=graphs))
    # the script really mixes chunks with decodes and ends on a prefix hit: request 0's 13 + 5 tokens had
    # 17 computed, 4 whole blocks of 4 cached
    assert any(len(s) > 1 and any(n > 1 for n, _ in s) for s in ref_shapes)
    assert hit == 16
    for r in range(2):
        logits, shapes, _ = ranks[r][(shape.name, graphs)]
        assert shapes == ref_shapes
        assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4), float((logits - ref).abs().max())
        # each rank's KV pool holds its own KV heads: 4 / 2, or the one head replicated
        assert ranks[r][(shape.name, graphs, "kv_heads")] == (2 if shape is TINY_GQA else 1)
    # both ranks sample from the same logits: equal bit for bit
    assert torch.equal(ranks[0][(shape.name, graphs)][0], ranks[1][(shape.name, graphs)][0])


@pytest.mark.parametrize("sync", ["shm", "gloo"])
def test_ranks_serve_the_same_steps_at_rank_zeros_times(ranks, sync):
    steps0, turns0 = ranks[0][("served", sync)]
    steps1, turns1 = ranks[1][("served", sync)]
    assert steps0 == steps1 and turns0 == turns1         # times included: one clock
    assert len(turns0) == 6 and all(math.isfinite(t[3]) for t in turns0)
    assert any(d > 1 for _, _, d, _, _ in steps0)       # a decode batch formed


@pytest.mark.parametrize("sync", ["shm", "gloo"])
def test_a_rank_that_plans_another_step_fails_on_every_rank_before_the_step(ranks, sync):
    for r in range(2):
        got = ranks[r][("diverged", sync)]
        assert got is not None, f"rank {r} served a diverged schedule without noticing"
        msg, steps = got
        # the first step differs (an 11-token prompt: one chunk under 12 tokens, 8 + 3 under 8): its check
        # raised before it ran (no step counted)
        assert "differs" in msg and steps == 0


def test_plan_digest_changes_with_any_decision_and_tokens():
    from sim.scheduler import Scheduled, SeqRequest, StepPlan
    r = SeqRequest("a", 9, 2, lambda i: ("a", i))
    r.blocks, r.num_computed_tokens = [5, 2, 9], 4

    def plan(n=5, blocks=None, free=7):
        if blocks is not None:
            r.blocks = blocks
        return StepPlan([Scheduled(r, n, False)], [], {}, free)
    base = plan_digest(0, plan())
    assert plan_digest(0, plan()) == base                            # deterministic
    assert plan_digest(0, plan(n=4)) != base                         # another chunk
    assert plan_digest(0, plan(free=6)) != base                      # another pool state
    assert plan_digest(0, plan(blocks=[5, 2, 8])) != base            # another block for the new K/V
    assert plan_digest(0, plan(blocks=[5, 2, 9]), extra=1) != base   # graphs given up on one rank
    assert tokens_digest(base, [3]) != tokens_digest(base, [4]) and tokens_digest(base, []) == base


def test_rank_shape_splits_heads_and_replicates_a_kv_head_over_more_ranks():
    s = rank_shape(TINY_GQA, 2)     # 8 query heads, 4 KV heads, 96 MLP columns
    assert (s.heads, s.kv_heads, s.intermediate, s.head_dim) == (4, 2, 48, 8)
    assert kv_heads_per_rank(TINY_GQA, 4) == 1 and kv_heads_per_rank(R.ONE_KV, 2) == 1
    # 12 heads and 96 MLP columns split over 6 ranks; 4 KV heads cannot be replicated evenly over them
    odd = TINY_GQA.__class__("odd", 2, 96, 12, 4, 96, 101, 512)
    with pytest.raises(ValueError, match="kv_heads 4 cannot be replicated evenly over tp=6"):
        kv_heads_per_rank(odd, 6)


def bench_tp():
    from bench_modules import load_bench
    return load_bench("gpu_tp_batched_validate")


def test_calibration_rows_keep_the_slowest_ranks_time_per_sample():
    slowest_rows = bench_tp().slowest_rows
    r0 = [{"key": "1:0:64", "ms": 10.0, "gpu_ms": 9.0, "min_ms": 9.5}, {"key": "4:0:128", "ms": 12.0, "gpu_ms": 11.0}]
    r1 = [{"key": "1:0:64", "ms": 10.4, "gpu_ms": 8.8, "min_ms": 9.9}, {"key": "4:0:128", "ms": 11.5, "gpu_ms": 11.2}]
    got = slowest_rows([r0, r1])
    assert got[0] == {"key": "1:0:64", "ms": 10.4, "gpu_ms": 9.0, "min_ms": 9.9, "ms_fastest_rank": 10.0}
    assert got[1] == {"key": "4:0:128", "ms": 12.0, "gpu_ms": 11.2, "ms_fastest_rank": 11.5}
    with pytest.raises(ValueError, match="same ones"):
        slowest_rows([r0, r1[:1]])


def test_shape_calibration_gets_what_the_runs_and_comparison_leave():
    shape_budget_s = bench_tp().shape_budget_s
    # 300 s left, 4 runs of 28 s and 40 s kept for the end: 148 s free, 70 asked
    assert shape_budget_s(300, 4, 28, 40, 70) == 70
    assert shape_budget_s(200, 4, 28, 40, 70) == 48
    assert shape_budget_s(100, 4, 28, 40, 70) == 0


def test_device_script_runs_on_two_cpu_ranks_and_compares_every_run(tmp_path):
    # run 27's own script in its CPU mode: 2 gloo ranks, the tiny GQA model, priced as Llama-3.1-70B at TP 4
    r = subprocess.run(["bash", "bench/gpu_run27_tp4_batched.sh", "--cpu-smoke"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=400, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "run27.tgz"]
    run = tmp_path / "run"
    with tarfile.open(tmp_path / "run27.tgz") as t:
        t.extractall(run, filter="data")
    import pandas as pd
    import yaml
    env = json.loads((run / "env.json").read_text())
    assert env["world"] == 2 and set(env["sync_cost"]) == {"shm", "gloo"}
    assert env["checks"]["checks"] > env["checks"]["steps"] > 0     # every step checked, and the calibration's
    # the sharded executor checked against the unsharded one before anything was timed
    assert env["tp_check"]["passed"] and env["tp_check"]["prefix_hit_tokens"] == 16
    prof = yaml.safe_load((run / "profile_calibrated.yaml").read_text())
    it = prof["models"]["llama3.1-70b"]["iteration"]
    assert prof["tp"] == 4 and it["steps_ms"]["ms"] and it["host_step_ms"]["ms"]
    raw = pd.read_csv(run / "iteration_raw.csv")
    assert (raw.kind == "step").sum() > 0 and (raw.ms >= raw.ms_fastest_rank).all()
    assert list(yaml.safe_load((run / "allreduce_h100.yaml").read_text())["tp"]) == [2]
    result = json.loads((run / "compare.json").read_text())
    assert set(result) == {"calibrated", "roofline"}
    for summary in result.values():
        assert set(summary["runs"]) == {"recompute_r8", "hbm_r8", "recompute_r4", "hbm_r4"}
        assert all(v["turns_matched"] == v["turns_meas"] > 0 for v in summary["runs"].values())
    # steps run at their static shapes but where a shape with chunks was never calibrated (then eagerly)
    steps = pd.read_csv(run / "steps.csv")
    assert steps.graph.mean() > 0.9 and (steps.tp == 2).all()


def test_shm_sync_gives_every_rank_rank_zeros_readings_and_fails_loudly_without_a_rank():
    import threading
    from gpu.tp_batched import RankDivergence, RankTimeout
    path = ShmSync.create(2)
    try:
        s0, s1 = ShmSync(path, 0, 2, timeout_s=0.2), ShmSync(path, 1, 2, timeout_s=0.2)
        # more readings than the ring holds: rank 0 waits for rank 1 to take each slot before reusing it
        got = {}
        t = threading.Thread(target=lambda: got.setdefault(1, [s1.clock() for _ in range(600)]))
        t.start()
        mine = [s0.clock() for _ in range(600)]
        t.join()
        assert got[1] == mine and mine == sorted(mine)
        # checks: equal digests pass, a different one raises on the rank that sees it
        errs = {}

        def check(s, d):
            try:
                s.check(d)
            except (RankDivergence, RankTimeout) as exc:
                errs[s.rank] = type(exc).__name__
        for d0, d1 in ((7, 7), (7, 8)):
            ts = [threading.Thread(target=check, args=(s0, d0)), threading.Thread(target=check, args=(s1, d1))]
            for x in ts:
                x.start()
            for x in ts:
                x.join()
        assert errs == {0: "RankDivergence", 1: "RankDivergence"}
        # rank 0 gone: rank 1's next reading times out instead of hanging
        with pytest.raises(RankTimeout, match="rank 0's clock reading 600"):
            s1.clock()
    finally:
        os.unlink(path)
