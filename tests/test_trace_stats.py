"""Trace stats: history-based reuse for sessions, prefix reuse for Mooncake rows, and the CLI."""
import argparse
import json

import pandas as pd
import pytest

from sim import cli_trace
from sim.errors import KvsimError
from sim.trace import read_trace, validate_trace
from sim.trace_stats import per_turn, plot_stats, trace_stats


def _sessions():
    return validate_trace(pd.DataFrame({
        "session_id": ["a", "a", "a", "b"], "turn": [0, 1, 2, 0],
        "arrival_s": [0.0, None, None, 5.0], "think_s": [None, 1.0, 1.0, None],
        "prompt_tokens": [100, 10, 20, 50], "output_tokens": [200, 30, 40, 60]}))


def test_history_of_earlier_turns_is_the_reusable_part_of_each_input():
    pt = per_turn(_sessions())
    assert pt["input_tokens"].tolist() == [100, 300 + 10, 340 + 20, 50]
    assert pt["reusable_tokens"].tolist() == [0, 300, 340, 0]
    s = trace_stats(_sessions())
    assert (s["sessions"], s["turns"]) == (2, 4)
    assert s["reusable_share"] == pytest.approx(640 / 820)
    assert s["turns_per_session"]["max"] == 3


def test_prefix_rows_use_block_reuse_across_requests():
    df = validate_trace(pd.DataFrame({
        "session_id": ["r1", "r2"], "turn": [0, 0], "arrival_s": [0.0, 1.0],
        "prompt_tokens": [1100, 1500], "output_tokens": [5, 5], "prefix_hashes": [[1, 2, 3], [1, 2, 4]]}))
    assert per_turn(df)["reusable_tokens"].tolist() == [0, 1024]
    assert trace_stats(df)["reusable_share"] == pytest.approx(1024 / 2600)


def test_plot_writes_a_png(tmp_path):
    png = plot_stats(_sessions(), tmp_path / "s.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def _kvsim(*argv):
    parser = argparse.ArgumentParser(prog="kvsim")
    cli_trace.register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_builds_each_kind_of_trace_and_prints_stats(tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"timestamp": 0, "input_length": 1300, "output_length": 10, "hash_ids": [1, 2, 3]}\n'
                  '{"timestamp": 9, "input_length": 1500, "output_length": 10, "hash_ids": [1, 2, 4]}\n')
    assert _kvsim("trace", "mooncake", mc, "--out", tmp_path / "mc.parquet") == 0
    assert "reusable 1,024" in capsys.readouterr().out
    sg = tmp_path / "sg.json"
    sg.write_text('[{"id": "a_0", "conversations": [{"from": "human", "value": "hi there"}, '
                  '{"from": "gpt", "value": "hello!"}]}, {"id": "b_0", "conversa')
    assert _kvsim("trace", "sharegpt", "--input", sg, "--tokenizer", "chars", "--no-cache",
                  "--out", tmp_path / "sg.jsonl") == 0
    out = capsys.readouterr().out
    assert "1 conversations read, 1 skipped" in out and "ESTIMATE" in out
    assert read_trace(tmp_path / "sg.jsonl")["prompt_tokens"].tolist() == [2]
    assert _kvsim("trace", "synth", "--fit", tmp_path / "sg.jsonl", "--sessions", 30, "--rate", 2,
                  "--out", tmp_path / "syn.parquet") == 0
    assert read_trace(tmp_path / "syn.parquet")["session_id"].nunique() == 30
    assert _kvsim("trace", "stats", tmp_path / "syn.parquet", "--png", tmp_path / "syn.png",
                  "--json", tmp_path / "syn.json") == 0
    assert json.loads((tmp_path / "syn.json").read_text())["sessions"] == 30
    assert (tmp_path / "syn.png").exists()


def test_cli_rejects_bad_numbers_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        _kvsim("trace", "synth", "--sessions", "0", "--out", "x.parquet")
    assert exc.value.code == 2
    assert "--sessions: expected an integer from 1 to 10,000,000" in capsys.readouterr().err


def test_cli_names_the_input_when_no_conversation_is_usable(tmp_path, capsys):
    sg = tmp_path / "sg.json"
    sg.write_text('[{"id": "a_0", "conversations": [{"from": "robot", "value": "beep"}]}]')
    with pytest.raises(KvsimError) as exc:
        _kvsim("trace", "sharegpt", "--input", sg, "--tokenizer", "chars", "--no-cache", "--out", tmp_path / "sg.parquet")
    assert str(exc.value) == f"{sg}: no usable conversations (1 read, 1 skipped; first skip: {sg}:1: unknown role 'robot')"
    assert "skipped 1: unknown role 'robot'" in capsys.readouterr().out
    assert not (tmp_path / "sg.parquet").exists()
