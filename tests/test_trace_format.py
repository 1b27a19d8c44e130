"""Canonical trace files: every bad row is named by its file line and the reason, through the CLI too."""
import json
import subprocess
import sys

import pytest

from sim.errors import KvsimError
from sim.trace import read_trace

ROW0 = {"session_id": "a", "turn": 0, "arrival_s": 0, "prompt_tokens": 5, "output_tokens": 3}


def _jsonl(tmp_path, *lines, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("lines, message", [
    ([ROW0, '{"session_id": "a", "turn": 1, "think_s": 1 "prompt_tokens": 5}'],
     r"t\.jsonl:2: not valid JSON \(Expecting ',' delimiter\)"),
    ([ROW0, "[1, 2]"], r"t\.jsonl:2: expected a JSON object"),
    ([ROW0, "", {**ROW0, "session_id": "b", "prompt_tokens": -4}],  # a blank line keeps later line numbers
     r"t\.jsonl:3: prompt_tokens=-4, expected an integer >= 0"),
    ([{**ROW0, "session_id": "z"}, {**ROW0, "turn": 2, "arrival_s": None, "think_s": 1.0}],
     r"t\.jsonl:2: session 'a': turn 2 follows turn nothing, expected turn 0"),
    ([ROW0, {**ROW0, "turn": 2, "arrival_s": None, "think_s": 1.0}],
     r"t\.jsonl:2: session 'a': turn 2 follows turn 0, expected turn 1"),
    ([{**ROW0, "session_id": "z"}, {**ROW0, "arrival_s": None}],
     r"t\.jsonl:2: session 'a': turn 0 has no arrival_s"),
    ([ROW0, {**ROW0, "turn": 1, "arrival_s": None}], r"t\.jsonl:2: session 'a' turn 1: needs arrival_s or think_s"),
    ([{**ROW0, "arrival_s": "soon"}], r"t\.jsonl:1: arrival_s='soon', expected a finite number of seconds >= 0"),
])
def test_bad_jsonl_row_is_named_by_its_file_line_and_reason(tmp_path, lines, message):
    with pytest.raises(KvsimError, match=message):
        read_trace(_jsonl(tmp_path, *lines))


def test_bad_csv_row_is_named_by_its_file_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("session_id,turn,arrival_s,think_s,prompt_tokens,output_tokens\n"
                    "b,0,1,,5,3\na,0,0,,5,3\na,1,,oops,5,3\n")
    with pytest.raises(KvsimError, match=r"t\.csv:4: think_s='oops', expected a finite number of seconds >= 0"):
        read_trace(path)


def test_missing_times_are_allowed_where_the_schema_allows_them(tmp_path):
    df = read_trace(_jsonl(tmp_path, ROW0, {**ROW0, "turn": 1, "arrival_s": None, "think_s": 2.5}))
    assert df["think_s"].isna().tolist() == [True, False]


def test_cli_prints_one_line_and_exits_2_without_a_traceback(tmp_path):
    path = _jsonl(tmp_path, ROW0, '{"session_id": "a", "turn": 1,')
    p = subprocess.run([sys.executable, "-m", "sim.cli", "trace", "stats", str(path), "--png", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"kvsim: error: {path}:2: not valid JSON "
                                             "(Expecting property name enclosed in double quotes), "
                                             "expected one trace row object per line"]
