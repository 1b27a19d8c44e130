import subprocess
import sys

import pytest

from sim.config import load_config, parse_bytes
from sim.errors import KvsimError


def test_byte_sizes_accept_si_and_binary_units():
    assert parse_bytes("128GB") == 128e9
    assert parse_bytes("1.5TiB") == 1.5 * 2**40
    assert parse_bytes(4096) == 4096


@pytest.mark.parametrize("raw, fragment", [
    ({"hots": {}}, "hots: unknown key"),
    ({"host": {"dram_bytes": "lots"}}, "host.dram_bytes: expected a byte size"),
    ({"policy": {"kind": "magic"}}, "policy.kind: expected one of recompute, hbm_prefix, attentionstore"),
    ({"gpu": {"count": 0}}, "gpu.count: expected a value >= 1"),
    ({"scheduler": {"max_batch": "many"}}, "scheduler.max_batch: expected an integer"),
    ({"policy": {"async_save": "yes"}}, "policy.async_save: expected true or false"),
    ({"model": "gpt-5"}, "model: expected one of"),
    ({"policy": {"round_attention": {"enabled": True, "watershed_layer": 99}}}, "watershed_layer: expected < 40"),
])
def test_bad_config_names_key_and_expectation(raw, fragment):
    with pytest.raises(KvsimError, match=fragment.replace("(", r"\(")):
        load_config(raw)


def test_overrides_apply_by_dotted_path():
    cfg = load_config({}, {"host.dram_bytes": "64GB", "policy.eviction": "fifo", "seed": 7})
    assert cfg.host.dram_bytes == 64e9 and cfg.policy.eviction == "fifo" and cfg.seed == 7


def test_cli_reports_bad_yaml_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  kind: attentionstore\n  evicton: lru\n")
    p = subprocess.run([sys.executable, "-m", "sim.cli", "run", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml: policy.evicton: unknown key" in lines[0]
    assert "Traceback" not in p.stderr


def test_cli_missing_config_file_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sim.cli", "run", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "config file not found" in p.stderr


def test_trace_prefix_hashes_read_back_as_lists_or_none(tmp_path):
    import pandas as pd
    from sim.trace import read_trace, write_trace
    df = pd.DataFrame([dict(session_id="a", turn=0, arrival_s=0.0, prompt_tokens=600, output_tokens=3,
                            prefix_hashes=[7, 8]),
                       dict(session_id="b", turn=0, arrival_s=1.0, prompt_tokens=5, output_tokens=3,
                            prefix_hashes=None)])
    for ext in ("parquet", "jsonl"):
        back = read_trace(write_trace(df, tmp_path / f"t.{ext}"))
        assert back["prefix_hashes"].tolist() == [[7, 8], None]


def test_negative_byte_size_is_named_as_negative():
    with pytest.raises(KvsimError, match=r"host.dram_bytes: expected a byte size >= 0, got '-5GB'"):
        load_config({"host": {"dram_bytes": "-5GB"}})


@pytest.mark.parametrize("args, fragment", [
    (["--set", "policy.kind=[1"], "--set 'policy.kind=[1': the value is not valid YAML"),
    (["--set", "=3"], "--set '=3': expected KEY=VALUE"),
    (["--set", "ssd.bytes=-1TB"], "ssd.bytes: expected a byte size >= 0"),
    (["--set", "scheduler.max_batch=2.5"], "scheduler.max_batch: expected an integer, got 2.5"),
    (["--compare", "recompute,bogus"], "'bogus': expected policies from recompute, hbm_prefix, attentionstore"),
])
def test_cli_bad_arguments_print_one_line_exit_2_and_write_nothing(tmp_path, args, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workload:\n  synthetic:\n    n_sessions: 5\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sim.cli", "run", str(cfg), "--out", str(out), *args],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not out.exists()  # validated before anything ran


LLAMA2_7B_SHAPE = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008,
                   "vocab": 32000, "max_context_tokens": 4096}


def test_a_model_shape_given_in_yaml_simulates_like_the_named_one():
    from sim.runner import run_simulation
    named = load_config({"model": "llama2-7b", "workload": {"synthetic": {"n_sessions": 20}}})
    custom = load_config({"model": "my-7b", "model_shape": LLAMA2_7B_SHAPE, "workload": {"synthetic": {"n_sessions": 20}}})
    assert custom.shape().kv_bytes_per_token == named.shape().kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert custom.shape().weight_bytes == named.shape().weight_bytes
    a, b = run_simulation(named).turns, run_simulation(custom).turns
    assert a["ttft_s"].tolist() == b["ttft_s"].tolist()


@pytest.mark.parametrize("shape, fragment", [
    ({**LLAMA2_7B_SHAPE, "kv_heads": 5}, "model_shape.kv_heads: expected a divisor of heads (32), got 5"),
    ({k: v for k, v in LLAMA2_7B_SHAPE.items() if k != "vocab"}, "model_shape.vocab: missing; expected an integer"),
    ({**LLAMA2_7B_SHAPE, "layers": 0}, "model_shape.layers: expected a value >= 1"),
    ({**LLAMA2_7B_SHAPE, "dtype": "bf16"}, "model_shape.dtype: unknown key"),
])
def test_bad_model_shape_names_key_and_expectation(shape, fragment):
    with pytest.raises(KvsimError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config({"model": "mine", "model_shape": shape})


def test_named_models_key_sweep_points_as_before_model_shape_existed():
    from sim.config import config_to_dict
    assert "model_shape" not in config_to_dict(load_config({}))


def test_printed_summary_shows_traffic_and_peak_memory_in_gb():
    from sim.cli import format_summary
    s = {"policy": "attentionstore", "turns": 3, "sessions": 1, "ttft_mean_s": 0.1, "ttft_p50_s": 0.1,
         "ttft_p90_s": 0.1, "ttft_p99_s": 0.1, "prefill_tokens_per_s": 10.0, "hit_rate_hbm": 0.0,
         "hit_rate_dram": 1.0, "hit_rate_ssd": 0.0, "miss_rate": 0.0, "reused_token_fraction": 0.5,
         "gpu_busy_s": 1.0, "bytes_h2d": 2.5e9, "bytes_d2h": 1e9, "bytes_ssd_read": 3e9, "bytes_ssd_write": 4.3e9,
         "peak_hbm_bytes": 5.13e9, "peak_dram_bytes": 6e9, "makespan_s": 2.0, "cost_usd": 1.0,
         "cost_per_1k_turns_usd": 333.0}
    rows = {line[:20].strip(): line[20:].strip() for line in format_summary([s]).splitlines()[1:]}
    assert rows["loaded to HBM"] == "2.5 GB"
    assert rows["SSD read / written"] == "3.0 / 4.3 GB"
    assert rows["peak KV in HBM"] == "5.13 GB"
