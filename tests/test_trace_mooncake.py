"""Mooncake import: faithful conversion, prefix reuse across requests, bad lines, optional session chaining."""
import json

import numpy as np
import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.trace import read_trace, validate_trace, write_trace
from sim.trace_mooncake import chain_sessions, prefix_hit_blocks, read_mooncake, reusable_prefix_tokens


def _write(tmp_path, rows, name="mc.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(ts, n_in, n_out, hashes):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": hashes}


def test_each_request_becomes_a_one_turn_session_at_its_timestamp(tmp_path):
    df, rep = read_mooncake(_write(tmp_path, [_row(0, 1300, 10, [1, 2, 3]), _row(2500, 600, 7, [1, 4])]))
    df = validate_trace(df)
    assert df["turn"].tolist() == [0, 0] and df["session_id"].nunique() == 2
    assert df["arrival_s"].tolist() == [0.0, 2.5]
    assert df["prompt_tokens"].tolist() == [1300, 600] and df["output_tokens"].tolist() == [10, 7]
    assert [list(h) for h in df["prefix_hashes"]] == [[1, 2, 3], [1, 4]]
    assert (rep.rows_read, rep.rows_used, sum(rep.skipped.values())) == (2, 2, 0)


def test_shared_leading_blocks_are_reusable_from_any_earlier_request(tmp_path):
    rows = [_row(0, 1300, 5, [1, 2, 3]),      # A: nothing cached yet
            _row(10, 1400, 5, [1, 2, 4]),     # shares A's first two blocks
            _row(20, 2000, 5, [1, 2, 3, 5]),  # extends A: three full blocks
            _row(30, 1500, 5, [9, 2, 3]),     # same ids 2, 3 but under another first block: no reuse
            _row(40, 1300, 5, [1, 2, 3])]     # A again: whole input, capped at its length
    df, _ = read_mooncake(_write(tmp_path, rows))
    assert reusable_prefix_tokens(df).tolist() == [0, 1024, 1536, 0, 1300]


def test_reuse_follows_timestamps_not_file_order(tmp_path):
    df, rep = read_mooncake(_write(tmp_path, [_row(5000, 1024, 5, [1, 2]), _row(1000, 1024, 5, [1, 2])]))
    assert reusable_prefix_tokens(df).tolist() == [1024, 0]
    assert rep.warnings["timestamp earlier than the line before (replayed in time order)"] == 1


def test_prefix_hit_blocks_is_a_longest_common_prefix_over_earlier_requests():
    assert prefix_hit_blocks([[7, 8], [7, 8, 9], [7, 9], [6]]).tolist() == [0, 2, 1, 0]
    assert prefix_hit_blocks([[7, 8], [7, 8, 9]], order=[1, 0]).tolist() == [2, 0]


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tmp_path):
    rows = [_row(0, 600, 5, [1, 2]), "{not json", {"timestamp": 1, "input_length": 5, "hash_ids": [1]},
            _row(2, 600, 0, [1, 2]), _row(3, 600, 5, [1, "b"]), "", _row(-1, 600, 5, [1, 2]),
            _row(4, 600.5, 5, [1, 2]), _row(5, 9000, 5, [3, 4])]
    path = _write(tmp_path, rows)
    df, rep = read_mooncake(path)
    assert len(df) == 2 and rep.rows_read == 8 and sum(rep.skipped.values()) == 6
    assert rep.examples[0] == f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes)"
    assert rep.examples[1] == f"{path}:3: missing key(s) output_length"
    assert rep.examples[2] == f"{path}:4: output_length=0, expected an integer >= 1 and <= 1,000,000,000"
    assert rep.examples[3] == f"{path}:5: hash_ids, expected a list of 64-bit integers"
    assert rep.examples[4] == f"{path}:7: timestamp=-1, expected milliseconds >= 0 and <= 8.796e+15"
    assert rep.examples[5] == f"{path}:8: input_length=600.5, expected an integer >= 1 and <= 1,000,000,000"
    assert rep.warnings["hash_ids count differs from ceil(input_length/512)"] == 1
    with pytest.raises(KvsimError, match=r"mc\.jsonl:2: not valid JSON"):
        read_mooncake(path, strict=True)
    with pytest.raises(KvsimError, match="no usable rows"):
        read_mooncake(_write(tmp_path, ["[]"], name="empty.jsonl"))


def test_prefix_hashes_survive_a_parquet_round_trip(tmp_path):
    df, _ = read_mooncake(_write(tmp_path, [_row(0, 1300, 10, [1, 2, 3]), _row(1, 600, 7, [1, 4])]))
    back = read_trace(write_trace(df, tmp_path / "mc.parquet"))
    assert [list(h) for h in back["prefix_hashes"]] == [[1, 2, 3], [1, 4]]
    np.testing.assert_array_equal(reusable_prefix_tokens(back), reusable_prefix_tokens(df))
    pd.testing.assert_frame_equal(back.drop(columns="prefix_hashes"), validate_trace(df).drop(columns="prefix_hashes"))


def test_sessions_mode_chains_a_request_that_extends_an_earlier_one(tmp_path):
    rows = [_row(0, 1300, 100, [1, 2, 3]),          # turn 0 (full blocks 1, 2)
            _row(1000, 1700, 50, [1, 2, 30, 40]),   # holds 1300 + 100 earlier tokens: turn 1, 300 new
            _row(2000, 1800, 50, [1, 2, 31, 41]),   # extends the same prefix but turn 0 was taken: new session
            _row(3000, 1100, 5, [1, 7, 8]),         # shares only the first block (e.g. a system prompt)
            _row(4000, 2200, 5, [1, 2, 30, 40, 50])]  # continues the chained turn 1
    df, _ = read_mooncake(_write(tmp_path, rows))
    out, info = chain_sessions(df)
    out = validate_trace(out)
    assert info == {"requests": 5, "sessions": 3, "chained_requests": 2, "multi_turn_sessions": 1,
                    "prefix_but_too_short": 0}
    chained = out[out.groupby("session_id")["turn"].transform("size") == 3]
    assert chained["prompt_tokens"].tolist() == [1300, 300, 2200 - 1700 - 50]
    assert chained["arrival_s"].tolist() == [0.0, 1.0, 4.0]
    assert out["prefix_hashes"].isna().all()


def test_sessions_mode_does_not_chain_when_the_input_cannot_hold_the_earlier_reply(tmp_path):
    df, _ = read_mooncake(_write(tmp_path, [_row(0, 1300, 500, [1, 2, 3]), _row(1, 1500, 5, [1, 2, 9])]))
    out, info = chain_sessions(df)
    assert info["sessions"] == 2 and info["prefix_but_too_short"] == 1
