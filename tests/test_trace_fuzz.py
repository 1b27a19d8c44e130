"""Bad traces are one-line errors, never tracebacks or silently changed values; times stay relative.

The mutation fuzz (every column of the prefix row and of a pinned later turn set to wrong types, NaN,
+-inf, 0, negative, 1e308, 2^64, ... in .jsonl, .csv and .parquet; empty, binary, non-UTF-8, truncated
and huge-claimed files) is the quick set of bench/fuzz_traces.py, which runs the wider one with a hang
and memory guard.
"""
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.trace import read_trace, validate_trace

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_traces", ROOT / "bench" / "fuzz_traces.py")
fz = sys.modules.setdefault("fuzz_traces", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fz)

ROW0 = {"session_id": "a", "turn": 0, "arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 3}


def _jsonl(tmp_path, *rows, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _fuzz(cases):
    failures, counts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, case in enumerate(cases):
            outcome, detail = fz.judge(case, Path(tmp) / f"c{k}{case.fmt}")
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome not in ("clean error", "accepted"):
                failures.append(f"{outcome}: {case.name}: {detail}")
    return failures, counts


@pytest.mark.parametrize("fmt, rows", [(".jsonl", (0, 3)), (".csv", (0, 3)), (".parquet", (0,))])
def test_every_mutated_cell_is_a_clean_error_or_read_back_exactly(fmt, rows):
    # row 0: a prefix-hash row (turn 0); row 3: a later turn pinned by arrival_s (parquet is slower to
    # write: its other rows are in the bench's wider run)
    failures, counts = _fuzz(fz.cell_cases(formats=(fmt,), rows=rows))
    assert failures == []
    assert counts["clean error"] > 100 * len(rows) and counts["accepted"] > 15 * len(rows)  # both sides exercised


def test_empty_binary_non_utf8_truncated_and_huge_claimed_files_are_clean_errors():
    failures, counts = _fuzz(fz.file_cases(wide=False) + fz.footer_cases(all_fields=False))
    assert failures == []
    assert counts["clean error"] > 80


def test_every_mutated_mooncake_key_is_skipped_and_counted_or_read_exactly():
    failures, counts = _fuzz([c for c in fz.mooncake_cases() if c.name.startswith("mooncake line 2 ")])
    assert failures == []
    assert counts["accepted"] > 90


def test_the_fuzz_oracle_catches_a_silently_accepted_bad_value(monkeypatch):
    # the oracle must fail a reader that turns JSON true into one token
    import sim.trace as trace

    real = trace._numbers

    def lenient(s):
        v, missing, bad = real(s.map(lambda x: int(x) if isinstance(x, bool) else x))
        return v, missing, bad

    monkeypatch.setattr(trace, "_numbers", lenient)
    case = next(c for c in fz.cell_cases(formats=(".jsonl",), rows=(0,)) if c.name.endswith("prompt_tokens=true"))
    with tempfile.TemporaryDirectory() as tmp:
        assert fz.judge(case, Path(tmp) / "c.jsonl")[0] == "bad accepted"


@pytest.mark.parametrize("value, shown", [
    ("Infinity", "inf"), ("18446744073709551616", "18446744073709551616"), ("1000000000000000000", "1000000000000000000"),
    ("true", "True"), ('"12"', "'12'"), ("1.5", "1.5"), ("null", None),
])
def test_token_counts_must_be_integers_within_a_billion(tmp_path, value, shown):
    path = _jsonl(tmp_path, ROW0, '{"session_id": "b", "turn": 0, "arrival_s": 1, "prompt_tokens": %s, '
                                  '"output_tokens": 3}' % value)
    with pytest.raises(KvsimError) as exc:
        read_trace(path)
    got = "is missing" if shown is None else f"={shown}"
    assert str(exc.value) == f"{path}:2: prompt_tokens{got}, expected an integer >= 0 and <= 1,000,000,000"


@pytest.mark.parametrize("value", ["null", '""', "true", "1.5", "[1]"])
def test_session_id_must_be_a_non_empty_string_or_an_integer(tmp_path, value):
    path = _jsonl(tmp_path, ROW0, '{"session_id": %s, "turn": 0, "arrival_s": 1, "prompt_tokens": 5, '
                                  '"output_tokens": 3}' % value)
    with pytest.raises(KvsimError, match=r"t\.jsonl:2: session_id=.*, expected a non-empty string$"):
        read_trace(path)
    assert read_trace(_jsonl(tmp_path, {**ROW0, "session_id": 7}))["session_id"].tolist() == ["7"]


@pytest.mark.parametrize("hashes", ["123", [1.7, 2.2], [1.0], [True], [], [2**64], [[1]]])
def test_prefix_hashes_must_be_a_non_empty_list_of_64_bit_integers(tmp_path, hashes):
    path = _jsonl(tmp_path, {**ROW0, "prefix_hashes": hashes})
    with pytest.raises(KvsimError, match=r"t\.jsonl:1: prefix_hashes=.*, expected null or a non-empty list of "
                                         "64-bit integer block ids"):
        read_trace(path)


def test_prefix_hashes_on_a_session_of_several_turns_are_rejected(tmp_path):
    path = _jsonl(tmp_path, {**ROW0, "prefix_hashes": [1, 2]}, {**ROW0, "turn": 1, "arrival_s": None, "think_s": 1.0})
    with pytest.raises(KvsimError, match=r"t\.jsonl:2: session 'a' turn 1: prefix_hashes on a session of several "
                                         "turns, expected rows with prefix_hashes to be one-turn sessions"):
        read_trace(path)


def test_a_later_turn_pinned_before_the_turn_before_it_is_rejected(tmp_path):
    # turn 1 arrives 5 s after turn 0 (at 10 s) ended, so at 15 s or later; turn 2 is pinned at 12 s
    rows = [{**ROW0, "arrival_s": 10.0}, {**ROW0, "turn": 1, "arrival_s": None, "think_s": 5.0},
            {**ROW0, "turn": 2, "arrival_s": 12.0}]
    with pytest.raises(KvsimError, match=r"t\.jsonl:3: session 'a' turn 2: arrival_s=12\.0 is before turn 1 "
                                         r"arrives \(15\.0 s or later\)"):
        read_trace(_jsonl(tmp_path, *rows))
    rows[2]["arrival_s"] = 15.0  # not before: kept (the engine starts it when turn 1's reply is done)
    assert read_trace(_jsonl(tmp_path, *rows))["arrival_s"].tolist()[2] == 15.0


def test_epoch_arrivals_are_kept_relative_to_the_first_with_exact_differences():
    # 1.7e12 = 25,939,941 * 2^16 + 26,624: arrivals move back by 25,939,941 * 2^16 s, exactly
    df = pd.DataFrame({"session_id": ["a", "b", "c"], "turn": [0, 0, 0], "arrival_s": [1.7e12 + 0.5, 1.7e12 + 2.25, 1.7e12],
                       "prompt_tokens": [5, 5, 5], "output_tokens": [3, 3, 3]})
    assert validate_trace(df)["arrival_s"].tolist() == [26624.5, 26626.25, 26624.0]


def test_a_trace_that_starts_within_the_first_18_hours_keeps_its_times_bit_for_bit():
    raw = pd.read_parquet(ROOT / "traces" / "sharegpt_small.parquet")
    assert raw["arrival_s"].min() > 0  # the committed slice starts at 0.68 s, not 0
    got = read_trace(ROOT / "traces" / "sharegpt_small.parquet")
    want = raw.sort_values(["session_id", "turn"], kind="stable")["arrival_s"].to_numpy()
    assert np.array_equal(got["arrival_s"].to_numpy(), want, equal_nan=True)


def test_per_turn_ttft_of_an_epoch_trace_equals_the_same_trace_near_zero():
    from sim.config import load_config
    from sim.runner import run_simulation
    from sim.workload import load_workload
    from workloads import random_sessions

    df = random_sessions(12, seed=3)
    df["arrival_s"] = (df["arrival_s"] * 64).round() / 64  # exactly representable at 1.7e12 (spacing 2^-12 s)
    cfg = load_config({}, {"model": "llama2-7b"})
    near = run_simulation(cfg, load_workload(cfg, df)).turns
    far = run_simulation(cfg, load_workload(cfg, df.assign(arrival_s=df["arrival_s"] + 1.7e12))).turns
    assert np.abs(far["ttft_s"].to_numpy() - near["ttft_s"].to_numpy()).max() < 1e-9
    assert (far["ttft_s"] >= far["prefill_s"] - 1e-9).all()


@pytest.mark.parametrize("arrivals, message", [
    ([0.0, 1e20], r"row 1: arrival_s=1e\+20, expected a finite number of seconds >= 0 and at most 8\.796e\+12"),
    ([0.0, 400 * 86400.0], r"row 1: session 'b': arrival_s=34560000\.0 is 400 days after the first arrival \(0\.0\), "
                           "expected a trace spanning at most a year"),
    ([0.0, math.inf], r"row 1: arrival_s=inf, expected a finite number"),
])
def test_times_must_be_finite_and_a_trace_spans_at_most_a_year(arrivals, message):
    df = pd.DataFrame({"session_id": ["a", "b"], "turn": [0, 0], "arrival_s": arrivals,
                       "prompt_tokens": [5, 5], "output_tokens": [3, 3]})
    with pytest.raises(KvsimError, match=message):
        validate_trace(df)


@pytest.mark.parametrize("body, message", [
    ("session_id,turn,arrival_s,prompt_tokens,output_tokens\na,0,0,true,3\n", r"t\.csv:2: prompt_tokens='true'"),
    ("session_id,turn,arrival_s,prompt_tokens,output_tokens\na,0,0,1_000,3\n", r"t\.csv:2: prompt_tokens='1_000'"),
    ("session_id,turn,arrival_s,prompt_tokens,output_tokens\na,0,0,5\n", r"t\.csv:2: 4 fields, expected 5"),
    ("session_id,turn,arrival_s,prompt_tokens,output_tokens\na,0,0,5,3,9\n", r"t\.csv:2: 6 fields, expected 5"),
    ("session_id,turn,arrival_s,prompt_tokens,output_tokens\na,0,0,5,3", r"t\.csv:2: the last line has no line end"),
    ('session_id,turn,arrival_s,prompt_tokens,output_tokens\n"a\nb",0,0,5,3\nc,0,x,5,3\n', r"t\.csv:4: arrival_s='x'"),
])
def test_csv_cells_are_read_strictly_and_named_by_their_line(tmp_path, body, message):
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(KvsimError, match=message):
        read_trace(path)


def test_csv_prefix_hashes_are_json_lists(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('session_id,turn,arrival_s,prompt_tokens,output_tokens,prefix_hashes\na,0,0,600,3,"[7, 8]"\n')
    assert read_trace(path)["prefix_hashes"].tolist() == [[7, 8]]


def test_a_parquet_footer_claiming_billions_of_rows_is_refused_before_reading(tmp_path):
    data = fz._base_bytes(".parquet")
    n = int.from_bytes(data[-8:-4], "little")
    tree, _ = fz.ThriftCompact.read_struct(data[-8 - n:-8], 0)
    footer = fz.ThriftCompact.write_struct(fz._thrift_set(tree, (3, 0, 2), 2**31 - 1))  # row group 0: num_rows
    path = tmp_path / "t.parquet"
    path.write_bytes(data[:-8 - n] + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    t0 = time.perf_counter()
    with pytest.raises(KvsimError, match=r"t\.parquet: parquet footer claims 2,147,483,647 rows in a [0-9,]+-byte "
                                         r"file \(corrupt file\)"):
        read_trace(path)
    assert time.perf_counter() - t0 < 1.0  # pyarrow would first allocate 4 GB for it


def test_a_jsonl_line_longer_than_the_limit_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import sim.trace as trace

    monkeypatch.setattr(trace, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(ROW0).encode() + b"\n" + b" " * (2 << 20))
    with pytest.raises(KvsimError, match=r"t\.jsonl:2: line longer than 1 MiB"):
        read_trace(path)


# ---------------------------------------------------------------- kvsim trace: where outputs go

def _cli(*args, cwd, monkeypatch, capsys):
    from sim.cli import main

    monkeypatch.chdir(cwd)
    rc = main(["trace", *map(str, args)])
    return rc, capsys.readouterr().err


def test_trace_stats_writes_its_figure_under_results_not_beside_the_trace(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    trace = _jsonl(data, ROW0, {**ROW0, "turn": 1, "arrival_s": None, "think_s": 1.0})
    rc, err = _cli("stats", trace, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "results" / "trace_stats" / "t.stats.png").is_file()
    assert sorted(x.name for x in data.iterdir()) == ["t.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--out", "afile"], "--out afile: exists and is not a folder"),
    (["--out", "afile/sub"], "--out afile/sub: afile is a file, not a folder"),
    (["--out", "/proc/kvsim_stats"], "--out /proc/kvsim_stats: cannot write in /proc"),
    (["--png", "fig.pdf"], "--png fig.pdf: extension '.pdf', expected .png"),
    (["--json", "afile"], "--json afile: no extension, expected .json"),
])
def test_trace_stats_output_errors_are_one_line_and_come_before_reading(tmp_path, args, message, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    # the trace does not exist: the output is checked first
    rc, err = _cli("stats", tmp_path / "missing.jsonl", *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"kvsim: error: {message}")


def test_trace_builders_check_their_outputs_before_building(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    for args, message in [(["synth", "--out", "x.csv"], "--out x.csv: extension '.csv', expected .parquet or .jsonl"),
                          (["synth", "--out", "afile/x.parquet"], "afile is a file, not a folder"),
                          (["synth", "--out", "x.parquet", "--save-spec", "/proc/s.yaml"], "cannot write in /proc"),
                          (["mooncake", "in.jsonl", "--out", "x.parquet", "--png", "afile"], "--png afile: no extension")]:
        rc, err = _cli(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["afile"]
