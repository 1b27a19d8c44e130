"""The batched executor's static step shapes (`sim.costmodel.StepPadding`, the one rule the executor
runs and the cost model prices) and the pricing of measured shapes (`IterationProfile.steps_ms`),
with hand-computed numbers."""
import pytest
import yaml

from gpu.calibrate import iteration_from_raw
from sim.costmodel import IterationProfile, StepPadding, Table2D, parse_profile, sqrt2_ladder
from sim.errors import KvsimError

PAD = StepPadding(batch=(1, 2, 4, 8), chunk_tokens=(16, 32, 64), keys=(64, 96, 128, 192, 256), chunk_slots=2)


def test_sqrt2_ladder_rounds_each_size_up_to_its_multiple():
    # 16, 22.6 -> 32, 32 (dropped: not larger), 45.3 -> 48, 64, 90.5 -> 96
    assert sqrt2_ladder(90, 16) == (16, 32, 48, 64, 96)


def test_a_decode_step_pads_its_batch_and_its_keys():
    # 3 rows -> 4; 100 keys + 1 for the padded row = 101 -> 128
    assert PAD.key((), 3, 100) == (4, 0, 128)
    # the step keeps that shape while 3 rows hold up to 128 - 1 keys
    assert PAD.decode_last_context(3, 100) == 127
    assert PAD.key((), 3, 127) == (4, 0, 128) and PAD.key((), 3, 128) == (4, 0, 192)


def test_a_mixed_step_pads_chunk_tokens_and_counts_every_gathered_key():
    # 20 new tokens -> 32 (12 padding tokens); keys: 100 decode + 1 padded row + 30 cached + 32 = 163 -> 192
    assert PAD.key([(20, 30)], 3, 100) == (4, 32, 192)
    # chunks alone: 20 + 10 = 30 -> 32; keys 30 cached + 32 = 62 -> 64
    assert PAD.key([(20, 30), (10, 0)], 0, 0.0) == (0, 32, 64)


@pytest.mark.parametrize("chunks,batch,ctx", [
    ([(1, 0)] * 3, 0, 0),      # more chunks than slots
    ((), 9, 9),                # batch past 8
    ([(65, 0)], 0, 0),         # chunk tokens past 64
    ((), 4, 257),              # keys past 256
    ((), 0, 0),                # nothing to run
])
def test_a_step_past_the_ladders_has_no_static_shape(chunks, batch, ctx):
    assert PAD.key(chunks, batch, ctx) is None


def flat(ms):
    return Table2D((1.0, 8.0), (0.0, 1000.0), ((ms, ms), (ms, ms)))


IT = IterationProfile(flat(50.0), flat(70.0), 0.0, PAD,
                      {(4, 0): ((96, 128, 192), (10.0, 12.0, 16.0)), (4, 32): ((192,), (20.0,))})


def test_a_measured_shape_costs_its_time_and_neighbours_interpolate_in_keys():
    assert IT.step_ms((), 3, 100) == 12.0                 # (4, 0, 128) measured
    assert IT.step_ms((), 3, 130) == 16.0                 # 131 keys -> 192
    assert IT.step_ms((), 3, 60) == 10.0                  # 61 -> 64: below the first measured, its time
    # 201 -> 256: past the last, the last segment's slope (16 - 12) / (192 - 128) per key: 16 + 64 / 16
    assert IT.step_ms((), 3, 200) == pytest.approx(20.0)
    assert IT.step_ms([(20, 30)], 3, 100) == 20.0         # (4, 32, 192)
    # batch 1 was not measured: the whole-step tables compose (chunk 70 + decode 50 - shared 0)
    assert IT.step_ms([(20, 30)], 1, 10) == 120.0


def test_a_step_with_chunks_of_an_unmeasured_key_count_costs_the_next_measured_one():
    # 40 + 1 + 0 + 32 = 73 keys -> 96, not measured at (4, 32): the executor runs it at 192
    assert IT.step_ms([(20, 0)], 3, 40) == 20.0
    # 3 rows, 20 new tokens in 2 chunks after 100 + 30 cached: 100 + 1 + 130 + 32 = 263 keys, past the
    # ladder (256): eager, the tables compose (70 + 70 + 50)
    assert IT.step_ms([(10, 100), (10, 30)], 3, 100) == 190.0
    it = IterationProfile(flat(50.0), flat(70.0), 0.0, PAD, {(4, 16): ((96,), (15.0,))})
    # 16 chunk tokens, 100 + 1 + 30 + 16 = 147 keys -> 192: no measured shape holds it, eager
    assert it.step_ms([(10, 30)], 3, 100) == 120.0


def test_the_executor_runs_a_chunk_step_at_the_shape_the_cost_model_prices():
    import torch
    from gpu.batched import BatchedExecutor, random_model
    from gpu.tp_layer import TINY_GQA
    ex = BatchedExecutor(random_model(TINY_GQA, 512, "cpu", torch.float32, seed=1), num_blocks=200,
                         block_tokens=4, decode_graphs=True)
    st = ex.static
    st.chunk_shapes = set()
    st.capture(keys=[(2, 16, 368)])         # on CPU: listed, not captured
    # 2 rows of 30 keys, 10 new tokens after 40: 60 + 40 + 16 = 116 -> 128, not listed: the next listed
    # key count of (2, 16) is 368
    assert st.padding.key([(10, 40)], 2, 60) == (2, 16, 128)
    assert st.key([30, 30], [(10, 40)]) == (2, 16, 368)
    assert st.key([30, 30], [(10, 400)]) is None           # 476 -> 512: nothing listed holds it
    assert st.key([30, 30]) == (2, 0, 64)                  # pure decode: every shape exists


def calibrated(tmp_path, rows, padding):
    prof = yaml.safe_load(open("results/gpu/run19_batched_graphs/profile_calibrated.yaml"))
    prof["models"]["llama3.1-8b"]["iteration"] = iteration_from_raw(rows, padding)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def grid_rows():
    rows = [dict(kind="decode", batch=b, context_tokens=c, new_tokens=0, history_tokens=0, ms=5.0 + b + c / 100)
            for b in (1, 8) for c in (0, 1000)]
    rows += [dict(kind="chunk", batch=0, context_tokens=0, new_tokens=n, history_tokens=h, ms=6.0 + n / 10)
             for n in (16, 64) for h in (0, 1000)]
    return rows


def test_calibration_writes_the_padding_and_the_median_per_shape(tmp_path):
    rows = grid_rows() + [dict(kind="step", batch=3, context_tokens=33, new_tokens=0, history_tokens=0, ms=t,
                               key="4:0:128") for t in (9.0, 11.0, 30.0)]
    rows.append(dict(kind="step", batch=3, context_tokens=33, new_tokens=20, history_tokens=30, ms=21.0,
                     key="4:32:192"))
    it = iteration_from_raw(rows, PAD)
    assert it["padding"] == {"batch": [1, 2, 4, 8], "chunk_tokens": [16, 32, 64], "keys": [64, 96, 128, 192, 256],
                             "chunk_slots": 2}
    assert it["steps_ms"] == {"batch": [4, 4], "chunk_tokens": [0, 32], "keys": [128, 192], "ms": [11.0, 21.0]}
    from sim.config import load_config
    from sim.costmodel import build_cost_model
    cost = build_cost_model(load_config({"model": "llama3.1-8b", "gpu": {"name": "h100-80gb", "count": 1},
                                         "hardware_profile": str(calibrated(tmp_path, rows, PAD))}))
    assert cost.decode_step_s(3, 100) == pytest.approx(0.011)
    # 10 steps of 3 rows from 100 keys: contexts 100, 103, ..., 127 at (4, 0, 128) = 11 ms each; the
    # span stops at the shape's last context (127) and continues unmeasured past it
    assert cost.decode_next_kink(3, 100) == 127
    total, k = cost.decode_span(3, 100, 10)
    assert k == 10 and total == pytest.approx(0.110)
    assert cost.iteration([(20, 30)], 3, 100).total_s == pytest.approx(0.021)


def test_a_profile_with_measured_shapes_but_no_padding_is_an_error(tmp_path):
    rows = grid_rows() + [dict(kind="step", batch=3, context_tokens=33, new_tokens=0, history_tokens=0,
                               ms=9.0, key="4:0:128")]
    path = calibrated(tmp_path, rows, PAD)
    prof = yaml.safe_load(path.read_text())
    del prof["models"]["llama3.1-8b"]["iteration"]["padding"]
    with pytest.raises(KvsimError, match=r"iteration\.padding: missing"):
        parse_profile(prof, "p.yaml")
    prof = yaml.safe_load(path.read_text())
    prof["models"]["llama3.1-8b"]["iteration"]["steps_ms"]["keys"] = [100]
    with pytest.raises(KvsimError, match=r"not one of the padding's buckets"):
        parse_profile(prof, "p.yaml")
    it = parse_profile(yaml.safe_load(path.read_text()), "p.yaml").models["llama3.1-8b"].iteration
    assert it.keyed == {(4, 0): ((128,), (9.0,))}


def bench_module():
    from bench_modules import load_bench
    return load_bench("gpu_batched_validate")


def test_a_replayed_shape_moves_to_the_middle_of_another_key_bucket():
    gbv = bench_module()
    # (4, 32, 192) -> 256: target (192 + 256 + 1) // 2 = 224 keys; now 100 + 1 + 30 + 32 = 163, so the
    # decode contexts grow by 61
    assert gbv.shape_at_keys((100, 3, [(20, 30)]), (4, 32, 256), PAD, 1000) == (161, 3, [(20, 30)])
    # no decodes: the first chunk's cached tokens move instead: 30 + 32 = 62 -> 80 keys (bucket 96)
    assert gbv.shape_at_keys((0, 0, [(20, 30)]), (0, 32, 96), PAD, 1000) == (0, 0, [(20, 48)])
    # 161 keys over 3 rows need 54 positions a row, past 40
    assert gbv.shape_at_keys((100, 3, [(20, 30)]), (4, 32, 256), PAD, 40) is None


def test_shapes_to_time_put_the_most_replayed_first_and_next_key_counts_last():
    gbv = bench_module()
    shapes = {(4, 32, 192): {"count": 5, "rep": (100, 3, [(20, 30)])},
              (4, 0, 128): {"count": 9, "rep": (100, 3, [])}}
    todo = gbv.shape_todo(shapes, PAD, 1000)
    assert [k for k, _ in todo] == [(4, 0, 128), (4, 32, 192), (4, 32, 256)]
    assert todo[2][1] == (161, 3, [(20, 30)])
    assert [k for k, _ in gbv.shape_todo(shapes, PAD, 1000, done={(4, 0, 128), (4, 32, 256)})] == [(4, 32, 192)]


def test_the_loops_host_time_is_the_median_per_bin_of_scheduled_requests():
    from gpu.calibrate import host_step_from_steps
    req = [1, 1, 1, 2, 3, 3, 40, 50, 60, 5]
    ms = [0.10, 0.12, 0.11, 0.2, 0.3, 0.25, 1.0, 1.2, 1.1, 9.0]
    # [1, 2): 1, 1, 1 -> 0.11; [2, 4): 2, 3, 3 -> requests 3, 0.25; [4, 8): one step, dropped; [32, 64): 50, 1.1
    assert host_step_from_steps(req, ms) == {"requests": [1.0, 3.0, 50.0], "ms": [0.11, 0.25, 1.1]}
    assert host_step_from_steps([1], [0.1]) is None


def test_a_replayed_steps_longest_context_keeps_its_row_and_the_rest_share_evenly():
    gbv = bench_module()
    # 100 keys over 3 rows, the longest 60: 60, then 40 over 2 rows
    assert gbv.shape_plan((100, 3, [(5, 0)], 60)) == ([60, 20, 20], [(5, 0)])
    # without it (or shorter than an even share): even, remainder first
    assert gbv.shape_plan((100, 3, [])) == ([34, 33, 33], [])
    assert gbv.shape_plan((100, 3, [], 10)) == ([34, 33, 33], [])
    # at most what leaves one token to each other row
    assert gbv.shape_plan((10, 3, [], 50)) == ([8, 1, 1], [])


def test_the_scatter_plot_draws_one_row_of_ttft_and_tpot_a_run(tmp_path):
    import pandas as pd
    from matplotlib import image

    from gpu.batched_validate import scatter_plot
    j = pd.DataFrame({"ttft_s_meas": [0.010, 0.020, 0.040], "ttft_s_sim": [0.011, 0.018, 0.040],
                      "tpot_s_meas": [0.008, 0.009, 0.010], "tpot_s_sim": [0.008, 0.009, 0.011]})
    path = tmp_path / "scatter.png"
    scatter_plot({"a": (j, "a: hbm, 6 sessions/s"), "b": (j, "b: dram, 2 sessions/s")}, path, "run: GPU, model")
    h, w = image.imread(path).shape[:2]
    assert w == int(8.5 * 110) and h == int(2 * 2.7 * 110)  # two rows of two panels at 110 dpi


def test_a_run_folders_table_is_read_plain_or_gzipped(tmp_path):
    import gzip

    import pandas as pd

    from gpu.batched_validate import csv_path
    assert csv_path(tmp_path, "steps.csv") == tmp_path / "steps.csv"  # neither: the plain name, for its error
    with gzip.open(tmp_path / "steps.csv.gz", "wt") as f:
        f.write("step,ms\n0,1.5\n")
    assert csv_path(tmp_path, "steps.csv") == tmp_path / "steps.csv.gz"
    assert pd.read_csv(csv_path(tmp_path, "steps.csv")).ms.tolist() == [1.5]
    (tmp_path / "steps.csv").write_text("step,ms\n0,2.5\n")
    assert csv_path(tmp_path, "steps.csv") == tmp_path / "steps.csv"  # a fresh plain table wins


def test_the_served_host_time_is_the_mean_gap_per_bin_skipping_idle_waits_and_each_runs_last_step():
    import pandas as pd
    from gpu.calibrate import host_step_from_served
    # run "a": steps start at 0, 10, 20.5, 31, 50 ms and run for 9.9, 10.2, 10.0, 9.0, 9.0 ms; step 3 finished
    # both its requests (the loop then slept to the next arrival): its 19 ms gap is no host time
    a = pd.DataFrame(dict(run="a", step=[0, 1, 2, 3, 4], start_s=[0.0, 0.010, 0.0205, 0.031, 0.050],
                          run_ms=[9.9, 10.2, 10.0, 9.0, 9.0], decodes=[1, 1, 2, 1, 1],
                          chunks=["", "", "", "8:0", ""], finished=[0, 0, 0, 2, 1]))
    # run "b" stacked after it (its start times restart at 0): steps 0-2 give 0.5, 0.8 and 0.2 ms at 1 request
    b = pd.DataFrame(dict(run="b", step=[0, 1, 2, 3], start_s=[0.0, 0.0105, 0.0213, 0.0315],
                          run_ms=[10.0, 10.0, 10.0, 10.0], decodes=[1, 1, 1, 1], chunks=[""] * 4,
                          finished=[0, 0, 0, 1]))
    got = host_step_from_served(pd.concat([a, b], ignore_index=True))
    # [1, 2): a0 0.1, a1 0.3, b0 0.5, b1 0.8, b2 0.2 -> mean 0.38; [2, 4): a2 0.5 alone, fewer than 3: dropped
    assert got["requests"] == [1.0]
    assert got["ms"] == [0.38]
    assert host_step_from_served(b.iloc[:2]) is None


def test_a_calibration_sample_is_followed_by_idle_time_in_proportion_to_its_wall_time(monkeypatch):
    from types import SimpleNamespace
    gbv = bench_module()
    ticks = iter([0.0, 0.004, 1.0, 1.010, 2.0, 2.006])   # runs of 4, 10 and 6 ms on the host clock
    slept = []
    monkeypatch.setattr(gbv, "time", SimpleNamespace(perf_counter=lambda: next(ticks), sleep=slept.append))
    ex = SimpleNamespace(tokens={}, run=lambda plan: SimpleNamespace(gpu_ms=1.0))
    walls, gpus, _ = gbv.time_step(ex, plan=None, reqs=[("r", [1, 2])], reps=2, idle_ratio=1.5)
    assert walls == pytest.approx([10.0, 6.0])            # the first run is the warm-up
    assert slept == pytest.approx([0.006, 0.015, 0.009])  # 1.5 x each run's wall time, the warm-up's too
    ticks = iter([0.0, 0.004, 1.0, 1.010])
    slept.clear()
    gbv.time_step(ex, plan=None, reqs=[], reps=1)
    assert slept == []
