"""The calibration writes exactly the cost model's profile schema (sim/costmodel.py is the one source)."""
import math

import pytest
import yaml

from gpu.calibrate import profile_from_raw, ssd_contention_fit, write_profile
from sim.costmodel import load_profile
from sim.errors import KvsimError

from calibration_samples import raw_samples


def test_profile_round_trips_through_the_cost_models_loader(tmp_path):
    out = tmp_path / "p.yaml"
    write_profile(raw_samples(), out, tmp_path / "raw.json")
    prof = load_profile(out)
    m = prof.models["llama2-7b"]
    # grid cells come back exactly; between cells the loader interpolates bilinearly, which is exact
    # for a function bilinear in (n, h)
    assert m.prefill_layer_ms(64, 256) == pytest.approx(0.1 + 0.064 + 1e-6 * 64 * 256, abs=1e-5)
    assert m.prefill_layer_ms(300, 600) == pytest.approx(0.1 + 0.3 + 1e-6 * 300 * 600, abs=1e-5)
    assert m.decode_layer_ms(4, 1024) == pytest.approx(0.2 + 1e-5 * 4 * 1024, abs=1e-5)
    assert m.head_decode_ms(4) == pytest.approx(0.19)
    assert prof.links["h2d_pinned"](1 << 24) == pytest.approx(40.0)
    assert prof.ssd_read(1 << 26) == pytest.approx(1.6)
    assert yaml.safe_load(out.read_text())["ssd"]["method"] == "o_direct"
    assert not list(tmp_path.glob("*.tmp"))


def test_calibration_records_the_tp_degree_its_tables_were_measured_at(tmp_path):
    # single-GPU samples (no "tp"): tp 1; a TP run's samples say their degree
    assert profile_from_raw(raw_samples())["tp"] == 1
    raw = raw_samples()
    raw["tp"] = 4
    write_profile(raw, tmp_path / "tp4.yaml")
    assert load_profile(tmp_path / "tp4.yaml").tp == 4


def test_bad_measurement_is_refused_before_anything_is_written(tmp_path):
    raw = raw_samples(prefill=lambda n, h: math.nan if n == 64 else 0.5)
    out = tmp_path / "p.yaml"
    with pytest.raises(KvsimError, match="prefill_layer_ms"):
        write_profile(raw, out)
    assert not out.exists()


def test_table_rows_follow_new_tokens_and_columns_history():
    prof = profile_from_raw(raw_samples())
    t = prof["models"]["llama2-7b"]["prefill_layer_ms"]
    assert len(t["ms"]) == len(t["new_tokens"]) and all(len(r) == len(t["history_tokens"]) for r in t["ms"])
    assert t["ms"][2][0] == pytest.approx(0.1 + 0.512)


def test_host_terms_are_recovered_from_executor_turns_that_pay_them():
    """A synthetic executor that pays 0.7 ms per turn, 0.02 ms per layer copy and 0.012 ms per gated
    layer on top of the tables: the reduction must give those numbers back (noise-free rows)."""
    from sim.costmodel import ProfileCost, parse_profile
    from sim.models import MODELS

    raw = raw_samples()
    truth = profile_from_raw(raw)
    truth["models"]["llama2-7b"].update(host_turn_ms=0.7, preload_gate_layer_ms=0.012, preload_layer_overhead_ms=0.02)
    pc = ProfileCost(MODELS["llama2-7b"], parse_profile(truth))
    rows = []
    for n in (1, 64, 512):
        rows.append({"tier": "recompute", "overlap": False, "read_buffer_layers": 1, "history_tokens": 0,
                     "new_tokens": n, "prefill_ms": 1e3 * pc.prefill_iteration(
                         0.0, pc.prefill_layer_s(n, 0), pc.prefill_head_s(n), 1, False).total_s})
        chunk = 256 * pc.shape.kv_bytes_per_token_layer
        load = chunk / pc.h2d_bw(chunk) + 0.02e-3
        for overlap in (False, True):
            rows.append({"tier": "dram", "overlap": overlap, "read_buffer_layers": 2, "history_tokens": 256,
                         "new_tokens": n, "prefill_ms": 1e3 * pc.prefill_iteration(
                             load, pc.prefill_layer_s(n, 256), pc.prefill_head_s(n), 2, overlap).total_s})
    raw["models"]["llama2-7b"]["serving"] = {"rows": rows}
    prof = profile_from_raw(raw)
    m = prof["models"]["llama2-7b"]
    assert m["host_turn_ms"] == pytest.approx(0.7, abs=1e-4)
    assert m["preload_gate_layer_ms"] == pytest.approx(0.012, abs=1e-4)
    assert m["preload_layer_overhead_ms"] == pytest.approx(0.02, abs=1e-4)
    assert load_profile_text(prof).models["llama2-7b"].host_turn_ms == pytest.approx(0.7, abs=1e-4)


def load_profile_text(prof):
    from sim.costmodel import parse_profile
    return parse_profile(prof, "p.yaml")


def test_read_under_write_probe_measures_raw_samples_that_calibration_reduces(tmp_path):
    from gpu.bench import ssd_read_under_write
    from gpu.calibrate import ssd_contention_fit

    r = ssd_read_under_write(tmp_path, token_bytes=4096, layers=4, pairs=((16, 64), (64, 16)), reps=1, settle_s=0.0)
    assert [(row["read_tokens"], row["write_tokens"]) for row in r["rows"]] == [(16, 64), (64, 16)]
    for row in r["rows"]:
        assert all(len(row[k]) == 1 and row[k][0] > 0 for k in ("read_alone_s", "write_alone_s",
                                                                  "read_under_write_s", "write_under_read_s"))
        assert "predicted_s" not in row     # the probe measures; the model choice is calibration's
    assert not list((tmp_path / "read_under_write").iterdir())     # its files are removed
    fit = ssd_contention_fit(r)
    for p, fifo in zip(fit["predicted_s"], fit["predicted_fifo_s"]):
        assert fifo >= p["none"] > 0 and p["even_split"] >= p["none"] and p["interleaved"] >= p["none"]
    assert fit["contention"] == min(fit["mean_rel_error"], key=fit["mean_rel_error"].get)


def _read_under_write(read_s, write_s, under_s, layers=4, lead_s=0.0):
    return {"layers": layers, "token_bytes": 4096, "lead_s": lead_s,
            "rows": [{"read_tokens": 16, "write_tokens": 64, "read_alone_s": [read_s], "write_alone_s": [write_s],
                      "read_under_write_s": [under_s], "write_under_read_s": [under_s]}]}


@pytest.mark.parametrize("under_s, mode", [
    (1.1, "none"),           # about as fast as alone: the directions do not touch
    (2.2, "even_split"),     # each read request takes its own 0.25 s plus 0.25 s: half the disk
    (4.5, "interleaved"),    # each read request also waits half the 2 s write request in service
])
def test_contention_fit_picks_the_model_nearest_the_measured_read(under_s, mode):
    """Read alone 1 s (4 requests of 0.25 s), write alone 8 s (4 requests of 2 s), both at once: the
    models predict 1 s, 4 x (0.25 + 0.25) = 2 s and 4 x (0.25 + 2 / 2) = 5 s for the read."""
    fit = ssd_contention_fit(_read_under_write(1.0, 8.0, under_s))
    assert fit["predicted_s"] == [pytest.approx({"none": 1.0, "even_split": 2.0, "interleaved": 5.0})]
    assert fit["predicted_fifo_s"] == [pytest.approx(9.0)]     # behind all the writes
    assert fit["contention"] == mode
    raw = raw_samples()
    raw["ssd"]["read_under_write"] = _read_under_write(1.0, 8.0, under_s)
    assert profile_from_raw(raw)["ssd"]["contention"] == mode


def test_samples_of_the_older_single_pair_probe_are_refused_not_refitted():
    old = {"layers": 32, "lead_s": 0.005, "read_alone_s": [0.1], "write_alone_s": [0.3], "read_under_write_s": [0.2]}
    with pytest.raises(KvsimError, match="ssd.read_under_write.rows: missing"):
        ssd_contention_fit(old)


def test_serving_overhead_turns_run_the_executor_on_both_paths():
    from gpu.bench import serving_overheads
    from gpu.model import TINY

    r = serving_overheads(TINY, new_tokens=(16, 32), hist_tokens=16, reps=2, idle_s=0.0, device="cpu")
    got = {(x["tier"], x["overlap"], x["new_tokens"]) for x in r["rows"]}
    assert got == {("recompute", False, 16), ("recompute", False, 32), ("dram", False, 16), ("dram", False, 32),
                   ("dram", True, 16), ("dram", True, 32)}
    assert len(r["rows"]) == 12 and all(x["prefill_ms"] > 0 for x in r["rows"])


def test_layer_writes_time_the_executors_save_pattern(tmp_path):
    from gpu.bench import ssd_layer_writes

    r = ssd_layer_writes(tmp_path, token_bytes=4096, layers=4, new_tokens=(16, 64), reps=1)
    assert [x["chunk_bytes"] for x in r["rows"]] == [16 * 4096, 64 * 4096]
    assert all(x["gbps"] > 0 and x["bytes"] == 4 * x["chunk_bytes"] for x in r["rows"])
    raw = raw_samples()
    raw["ssd"]["layer_writes"] = r
    prof = profile_from_raw(raw)
    assert prof["ssd"]["write"]["chunk_bytes"] == [16 * 4096, 64 * 4096]
    assert load_profile_text(prof).ssd_write(64 * 4096) == pytest.approx(r["rows"][1]["gbps"], rel=1e-3)


def test_next_turn_gap_is_the_median_host_time_after_replies_whose_session_goes_on():
    """Five queued turns served back to back (times in s on one clock): after the three turns whose
    session continues the next start came 1.0, 1.2 and 1.6 ms after their end -> median 1.2 ms; the
    0.1 ms after a session's last turn and the 5 ms before a turn that arrived late are not host time
    owed to a next turn."""
    from gpu.calibrate import next_turn_gap_ms

    rows = [  # (arrival, start, end, continues), listed out of serving order on purpose
        (0.0, 0.1012, 0.2, True),
        (0.0, 0.0, 0.1, True),          # its successor starts at 0.1010: 1.0 ms
        (0.0, 0.2016, 0.3, False),      # after 0.2 (continues): 1.6 ms; its own successor: 0.1 ms
        (0.0, 0.3001, 0.4, True),       # after a last turn: not counted
        (0.4049, 0.405, 0.5, True),     # arrived after 0.4's end: waited for its arrival, not counted
        (0.0, 0.5012, 0.6, False),      # after 0.5 (continues): 1.2 ms
    ]
    got = next_turn_gap_ms([{"arrival_s": a, "start_s": s, "end_s": e, "continues": c} for a, s, e, c in rows])
    assert got == pytest.approx(1.2, abs=1e-6)


def test_served_gaps_reach_the_profile_and_are_0_without_them():
    raw = raw_samples()
    assert "host_next_turn_ms" not in profile_from_raw(raw)["models"]["llama2-7b"]
    assert load_profile_text(profile_from_raw(raw)).models["llama2-7b"].host_next_turn_ms == 0.0
    raw["models"]["llama2-7b"]["served_gaps"] = {"rows": [
        {"arrival_s": 0.0, "start_s": 0.0, "end_s": 0.1, "continues": True},
        {"arrival_s": 0.0, "start_s": 0.1015, "end_s": 0.2, "continues": False}]}
    prof = profile_from_raw(raw)
    assert prof["models"]["llama2-7b"]["host_next_turn_ms"] == pytest.approx(1.5, abs=1e-6)
    assert load_profile_text(prof).models["llama2-7b"].host_next_turn_ms == pytest.approx(1.5, abs=1e-6)


def test_decode_after_prefill_is_the_median_decode_beyond_the_tables_per_prompt_length():
    """small_profile's llama2-7b decodes a batch-1 step at context c in 32 x (0.3 + 0.1 (c - 100) / 900) + 0.4
    ms (32 layers, the head's 0.4): a 99-token prompt's 3-token reply decodes 2 steps at 100 and 101 tokens,
    10.0 + 10.003556 = 20.003556 ms; a 999-token prompt's at 1000 and 1001, 13.2 + 13.203556 = 26.403556 ms.
    Measured decodes 1.0 and 1.4 ms longer after prefills of 5 and 6 ms (medians 5.5 -> 1.2), 3.0 ms longer
    after 40 ms; a decode faster than the tables counts as 0, not as a negative term."""
    from gpu.calibrate import decode_after_prefill
    from profiles import small_profile

    def row(p, prefill_ms, extra_ms):
        pred = {99: 20.0 + 32 * 0.1 / 900, 999: 26.4 + 32 * 0.1 / 900}[p]
        return {"prompt_tokens": p, "output_tokens": 3, "start_s": 1.0, "first_token_s": 1.0 + prefill_ms / 1e3,
                "end_s": 1.0 + (prefill_ms + pred + extra_ms) / 1e3}

    prof = small_profile()
    got = decode_after_prefill(prof, "llama2-7b", [row(99, 5.0, 1.0), row(99, 6.0, 1.4), row(999, 40.0, 3.0)])
    assert got["prefill_ms"] == pytest.approx([5.5, 40.0])
    assert got["ms"] == pytest.approx([1.2, 3.0], abs=1e-4)
    assert got["steps"] == 2                          # 3-token replies: 2 decode steps carry the term
    got = decode_after_prefill(prof, "llama2-7b", [row(99, 5.0, -0.5)])
    assert got == {"prefill_ms": [5.0], "ms": [0.0], "steps": 2}
    # it reaches the profile from the raw samples, and the profile loads with it
    raw = raw_samples()
    raw["models"]["llama2-7b"]["decode_probes"] = {"rows": [row(99, 5.0, 1.0)]}
    prof = profile_from_raw(raw)
    assert "decode_after_prefill_ms" in prof["models"]["llama2-7b"]
    assert load_profile_text(prof).models["llama2-7b"].decode_after_prefill_ms is not None


def test_time_cuda_ms_idles_after_each_sample_for_the_ratio_asked():
    """Four 5 ms samples (one warm-up) with idle_ratio 2: each is followed by >= 10 ms of idle, so the call
    lasts >= 4 x 15 ms; the idle is not in the samples."""
    import time

    from gpu.bench import time_cuda_ms

    t0 = time.perf_counter()
    ms = time_cuda_ms(lambda _: time.sleep(0.005), warmup=1, reps=3, idle_ratio=2.0)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert len(ms) == 3 and all(5.0 <= m < 15.0 for m in ms)
    assert wall_ms >= 3 * (sum(ms) + 5.0) - 1e-6
