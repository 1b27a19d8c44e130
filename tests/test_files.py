import pandas as pd
import pytest

from sim.files import atomic_write, atomic_write_json, atomic_write_parquet


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ttft_s": 1.5})

    def half_then_crash(p):
        p.write_text('{"ttft_s": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == '{\n  "ttft_s": 1.5\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_parquet_round_trips_into_a_new_folder(tmp_path):
    df = pd.DataFrame({"a": [1, 2]})
    out = atomic_write_parquet(df, tmp_path / "x" / "turns.parquet")
    assert pd.read_parquet(out)["a"].tolist() == [1, 2]
