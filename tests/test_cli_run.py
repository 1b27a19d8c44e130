"""`kvsim run`: where results go, what it checks before simulating, the summary it prints; `kvsim config keys`."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import format_summary, main, summary_warnings

SMALL = "name: t\nworkload:\n  synthetic:\n    n_sessions: 4\n"


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(SMALL)
    return cfg


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_huge_bandwidth_set_on_the_command_line_exits_2_naming_the_key(small, capsys):
    assert main(["run", str(small), "--set", "ssd.read_gbps=1e308"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("kvsim: error: --set ssd.read_gbps: expected a number from 0.001 to 100000 GB/s")
    assert not Path("results").exists()


def test_a_set_typo_is_blamed_on_set_not_on_the_config(small, capsys):
    assert main(["run", str(small), "--set", "policy.evicton=lru"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("kvsim: error: --set policy.evicton: unknown key") and "t.yaml" not in line


def _no_simulation(monkeypatch):
    import sim.runner

    def refuse(*a, **k):
        raise AssertionError("simulated before checking the output folder")
    monkeypatch.setattr(sim.runner, "run_simulation", refuse)


def test_an_unwritable_output_folder_is_refused_before_simulating(small, tmp_path, capsys, monkeypatch):
    _no_simulation(monkeypatch)
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses even root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs to stand for a read-only folder")
        out = Path("/sys/kvsim-results")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    assert main(["run", str(small), "--out", str(out)]) == 2
    assert f"--out {out}: cannot write in {out.parent}" in _one_error_line(capsys)


def test_out_naming_an_existing_file_is_refused_before_simulating(small, tmp_path, capsys, monkeypatch):
    _no_simulation(monkeypatch)
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["run", str(small), "--out", str(f)]) == 2
    assert f"--out {f}: exists and is not a folder" in _one_error_line(capsys)
    assert main(["run", str(small), "--out", str(f / "sub")]) == 2
    assert f"--out {f / 'sub'}: {f} is a file, not a folder" in _one_error_line(capsys)


def test_runs_with_different_set_keep_their_own_results(small, capsys):
    from sim.config import config_to_dict, load_config, parse_overrides
    from sim.sweep import config_key

    assert main(["run", str(small), "--set", "host.dram_bytes=1GB"]) == 0
    assert main(["run", str(small), "--set", "host.dram_bytes=2GB"]) == 0
    assert main(["run", str(small)]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("results: ")]
    key1 = config_key(config_to_dict(load_config(small, parse_overrides(["host.dram_bytes=1GB"]))))[:8]
    assert printed[0] == f"results: results/t-{key1}"
    assert len(set(printed)) == 3 and printed[2] == "results: results/t"
    dram = {p: json.loads((Path(p[len("results: "):]) / "config.json").read_text())["host"]["dram_bytes"]
            for p in printed}
    assert list(dram.values()) == [1e9, 2e9, 128e9]


def test_rerunning_an_edited_config_says_it_replaced_other_results(small, capsys):
    assert main(["run", str(small)]) == 0
    capsys.readouterr()
    small.write_text(SMALL + "seed: 3\n")
    assert main(["run", str(small)]) == 0
    assert "note: results/t held the results of a different config; replaced" in capsys.readouterr().err
    assert main(["run", str(small)]) == 0  # the same config again: nothing to say
    assert "note:" not in capsys.readouterr().err


def _summary(**kw):
    s = {"policy": "attentionstore", "turns": 10, "sessions": 1, "ttft_mean_s": 0.1, "ttft_p50_s": 0.1,
         "ttft_p90_s": 0.1, "ttft_p99_s": 0.1, "queue_mean_s": 0.25, "prefill_tokens_per_s": 10.0,
         "hit_rate_hbm": 0.0, "hit_rate_dram": 1.0, "hit_rate_ssd": 0.0, "miss_rate": 0.0,
         "reused_token_fraction": 0.5, "truncated_turns": 3, "gpu_busy_s": 1.0, "bytes_h2d": 2.5e9,
         "bytes_d2h": 1e9, "bytes_ssd_read": 3e9, "bytes_ssd_write": 4.3e9, "peak_hbm_bytes": 5.13e9,
         "peak_dram_bytes": 6e9, "makespan_s": 2.0, "cost_usd": 1.0, "cost_per_1k_turns_usd": 333.0}
    return {**s, **kw}


def _rows(text):
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "attentionstore")
    return {ln[:20].strip(): ln[20:].strip() for ln in lines[start + 1:] if not ln.startswith("warning")}


def test_printed_summary_shows_traffic_peak_memory_and_truncated_turns():
    rows = _rows(format_summary([_summary()]))
    assert rows["loaded to HBM"] == "2.5 GB"
    assert rows["SSD read / written"] == "3.0 / 4.3 GB"
    assert rows["peak KV in HBM"] == "5.13 GB"
    assert rows["truncated turns"] == "3 (30.0%)"
    assert rows["queue wait mean"] == "0.250 s"


def test_printed_summary_says_what_ran():
    from sim.config import load_config
    cfg = load_config({"workload": {"trace": "traces/sharegpt_small.parquet", "max_sessions": 300,
                                    "session_rate_per_s": 0.5}, "ssd": {"bytes": "2.5TB"}})
    head = format_summary([_summary()], cfg).splitlines()[:2]
    assert head[0] == "model llama2-13b on 1 x a100-80gb; DRAM 128 GB; SSD 2.5 TB (6 / 3 GB/s read / write)"
    assert head[1] == ("workload: trace sharegpt_small.parquet, first 300 sessions, Poisson arrivals at "
                       "0.5 sessions/s")


def test_warns_when_more_than_a_tenth_of_turns_are_truncated():
    assert summary_warnings(_summary(turns=100, truncated_turns=10)) == []
    (w,) = summary_warnings(_summary(turns=100, truncated_turns=11))
    assert w.startswith("11% of turns were truncated")


def _turns(queue):
    return pd.DataFrame({"arrival_s": [float(i) for i in range(len(queue))], "queue_s": queue})


def test_warns_when_the_queue_grows_without_bound():
    # waits 0, 0.5, ..., 49.5 s: first tenth mean 2.25 s, last tenth 47.25 s (> 10 s and > 5 x 2.25)
    (w,) = summary_warnings(_summary(truncated_turns=0), _turns([0.5 * i for i in range(100)]))
    assert w.startswith("the queue grows without bound: mean wait 47.2 s for the last tenth of arrivals vs 2.2 s")
    # a busy but stable queue (20 s throughout), and one that grows but stays under 10 s: no warning
    assert summary_warnings(_summary(truncated_turns=0), _turns([20.0] * 100)) == []
    assert summary_warnings(_summary(truncated_turns=0), _turns([0.09 * i for i in range(100)])) == []


def test_config_keys_lists_every_key_with_bounds(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert "ssd.read_gbps  (float, default 6, GB/s)" in out
    assert "    bounds: 0.001 to 100000 GB/s (" in out
    assert "    choices: recompute, hbm_prefix, attentionstore" in out
    assert main(["config", "keys", "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| key | type | default | unit | bounds | choices | help |"
    assert any(ln.startswith("| `host.dram_bytes` | size | 128GB | bytes | 0 to 10PB (") for ln in md)


def test_run_help_points_to_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "kvsim config keys" in capsys.readouterr().out


def test_a_warning_shared_by_every_policy_is_printed_once_and_others_name_theirs():
    a = _summary(policy="recompute", turns=100, truncated_turns=20)
    b = _summary(policy="attentionstore", turns=100, truncated_turns=20)
    grow = _turns([0.5 * i for i in range(100)])
    warnings = [ln for ln in format_summary([a, b], turns=[_turns([1.0] * 100), grow]).splitlines()
                if ln.startswith("warning")]
    assert warnings[0].startswith("warning: 20% of turns were truncated")
    assert warnings[1].startswith("warning: attentionstore: the queue grows without bound")
    assert len(warnings) == 2
