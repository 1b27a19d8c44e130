import dataclasses
import math
import subprocess
import sys
from pathlib import Path

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
    ({"gpu": {"count": 0}}, "gpu.count: expected an integer from 1 to 1,024 GPUs"),
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
    ({**LLAMA2_7B_SHAPE, "layers": 0}, "model_shape.layers: expected an integer from 1 to 1,000 layers"),
    ({**LLAMA2_7B_SHAPE, "dtype": "bf16"}, "model_shape.dtype: unknown key"),
])
def test_bad_model_shape_names_key_and_expectation(shape, fragment):
    with pytest.raises(KvsimError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config({"model": "mine", "model_shape": shape})


def test_named_models_key_sweep_points_as_before_model_shape_existed():
    from sim.config import config_to_dict
    assert "model_shape" not in config_to_dict(load_config({}))


# ---------------------------------------------------------------- bounds, overrides, files

def _set(*items):
    from sim.config import parse_overrides
    return parse_overrides(list(items))


@pytest.mark.parametrize("item, fragment", [
    # each used to reach the engine: a NaN clock (hang), ZeroDivisionError, OverflowError, islice ValueError
    ("ssd.read_gbps=1e308", "--set ssd.read_gbps: expected a number from 0.001 to 100000 GB/s"),
    ("ssd.read_gbps=1e13", "--set ssd.read_gbps: expected a number from 0.001 to 100000 GB/s"),
    ("ssd.read_gbps=1e-300", "--set ssd.read_gbps: expected a number from 0.001 to 100000 GB/s"),
    ("gpu.count=1e308", "--set gpu.count: expected an integer from 1 to 1,024 GPUs"),
    ("scheduler.lookahead_jobs=1e19", "--set scheduler.lookahead_jobs: expected an integer from 0 to 1,000,000 jobs"),
    ("seed=18446744073709551616", "--set seed: expected an integer from 0 to 4,294,967,295"),
    ("workload.session_rate_per_s=1e-300", "--set workload.session_rate_per_s: expected a number from 0.0001 to"),
    ("host.dram_bytes=1e400", "--set host.dram_bytes: expected a finite byte size, got '1e400'"),
    ("host.dram_bytes=20PB", "--set host.dram_bytes: expected a byte size from 0 to 10PB"),
    ("gpu.prefill_mfu=.nan", "--set gpu.prefill_mfu: expected a finite number, got nan"),
])
def test_out_of_range_numbers_are_one_line_errors_naming_the_set_key(item, fragment):
    with pytest.raises(KvsimError) as exc:
        load_config("configs/default.yaml", _set(item))
    assert str(exc.value).startswith(fragment), str(exc.value)


def test_integers_given_in_e_notation_are_read_as_integers():
    assert load_config({}, _set("scheduler.lookahead_jobs=1e3")).scheduler.lookahead_jobs == 1000


def test_a_set_typo_names_set_not_the_config_file():
    with pytest.raises(KvsimError) as exc:
        load_config("configs/default.yaml", _set("policy.evicton=lru"))
    assert str(exc.value).startswith("--set policy.evicton: unknown key; expected one of async_save, eviction")
    assert "default.yaml" not in str(exc.value)
    with pytest.raises(KvsimError, match=r"^--set hots: unknown key"):
        load_config("configs/default.yaml", _set("hots.dram_bytes=1GB"))


def test_a_bad_key_in_the_file_is_still_blamed_on_the_file_when_set_is_given(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy:\n  evicton: lru\n")
    with pytest.raises(KvsimError, match=r"c\.yaml: policy\.evicton: unknown key"):
        load_config(cfg, _set("policy.kind=recompute"))


def test_a_key_set_twice_is_an_error():
    with pytest.raises(KvsimError, match=r"^--set seed: given twice \(1 and 2\)"):
        _set("seed=1", "seed=2")


def test_merged_overrides_keep_where_each_came_from():
    over = _set("seed=1").merged({"policy.kind": "bogus"})
    with pytest.raises(KvsimError, match=r"^--set seed"):
        load_config({}, over.merged({"seed": -1}, origin="--set"))
    with pytest.raises(KvsimError, match=r"^<config>: policy\.kind: expected one of"):
        load_config({}, over)


def test_a_latin1_config_is_one_line_naming_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("name: x\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(KvsimError, match=r"c\.yaml: line 2: byte 0xe9 is not UTF-8; expected a config file"):
        load_config(cfg)


def test_a_trace_passed_as_config_says_what_it_is(tmp_path):
    with pytest.raises(KvsimError, match=r"sharegpt_small\.parquet: expected a config file \(YAML text\), got a parquet"):
        load_config("traces/sharegpt_small.parquet")
    blob = tmp_path / "c.bin"
    blob.write_bytes(b"\x00\x01\x02name: x")
    with pytest.raises(KvsimError, match=r"c\.bin: expected a config file \(YAML text\), got a binary file"):
        load_config(blob)


def test_duplicate_keys_name_file_line_and_key_in_configs_and_sweep_specs(tmp_path):
    from sim.sweep import load_sweep_spec
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy:\n  kind: recompute\n  eviction: lru\n  kind: attentionstore\n")
    with pytest.raises(KvsimError, match=r"c\.yaml: line 4: key 'kind' given twice \(first on line 2\)"):
        load_config(cfg)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbase: c.yaml\ngrid: {seed: [1]}\ngrid: {seed: [2]}\n")
    with pytest.raises(KvsimError, match=r"s\.yaml: line 4: key 'grid' given twice \(first on line 3\)"):
        load_sweep_spec(spec)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_is_an_error_that_says_how_to_ask_for_defaults(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(KvsimError, match=r"c\.yaml: the config file is empty; .*write \{\} for every default"):
        load_config(cfg)
    cfg.write_text("{}\n")
    assert load_config(cfg).workload.synthetic.n_sessions == 1000


def test_yaml_that_would_overflow_the_parser_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("[" * 1000)
    with pytest.raises(KvsimError, match=r"c\.yaml: nested too deeply"):
        load_config(cfg)
    cfg.write_text("seed: " + "9" * 5000 + "\n")
    with pytest.raises(KvsimError, match=r"c\.yaml: unreadable value"):
        load_config(cfg)


def test_an_empty_or_folder_trace_path_is_refused(tmp_path):
    with pytest.raises(KvsimError, match=r"workload\.trace: expected the path of a file, got ' '"):
        load_config({"workload": {"trace": " "}})
    with pytest.raises(KvsimError, match=r"workload\.trace: file '.*' not found"):
        load_config({"workload": {"trace": str(tmp_path)}})


def test_every_numeric_key_has_bounds_and_every_key_has_help():
    from sim.config import config_keys
    keys = config_keys()
    assert {k.key for k in keys} >= {"ssd.read_gbps", "workload.synthetic.n_sessions", "model_shape.layers",
                                     "policy.round_attention.kept_fraction"}
    for k in keys:
        assert k.help, k.key
        if k.type.split()[0] in ("int", "float", "size"):
            assert k.bounds, k.key


def test_config_keys_cover_every_leaf_of_the_resolved_config():
    from sim.config import _KEYED_WHEN_SET, config_keys, config_to_dict

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    listed = {k.key for k in config_keys()}
    # keys added later stay out of the resolved config at their defaults (sweep keys do not move)
    assert set(leaves(config_to_dict(load_config({})))) == {
        k for k in listed if not k.startswith("model_shape.") and k not in _KEYED_WHEN_SET}
    set_ = config_to_dict(load_config({"gpu": {"allreduce": "ring", "count": 4}}))
    assert set_["gpu"]["allreduce"] == "ring" and "nvlink_gbps" not in set_["gpu"]


def test_metadata_leaves_the_resolved_config_as_it_was():
    from sim.config import config_to_dict
    d = config_to_dict(load_config({}))
    assert d["host"] == {"dram_bytes": 128e9, "h2d_gbps": 25.0, "d2h_gbps": 25.0}
    assert d["gpu"] == {"name": "a100-80gb", "count": 1, "hbm_bytes": None, "peak_flops": None, "hbm_bw_gbps": None,
                        "efficiency": "measured", "prefill_mfu": 0.55, "decode_mbu": 0.75,
                        "reserved_fraction": 0.10}
    assert list(d) == ["name", "seed", "model", "max_context_tokens", "gpu", "hardware_profile", "host", "ssd",
                       "scheduler", "workload", "policy", "prices"]


# ---------------------------------------------------------------- fuzz: every key x every bad value

BAD_VALUES = [{"a": 1}, "abc", True, math.nan, math.inf, -math.inf, 0, -1, 1e308, 2**64, "", [], None]


def _fuzz_keys():
    from sim.config import config_keys
    keys = [k.key for k in config_keys()]
    sections = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    return keys + sections


def test_every_key_set_to_any_bad_value_is_a_config_or_a_one_line_error():
    import yaml
    raw = yaml.safe_load(open("configs/default.yaml"))
    raw["workload"]["trace"] = str(Path("traces/sharegpt_small.parquet").resolve())
    with_shape = {**raw, "model": "mine", "model_shape": LLAMA2_7B_SHAPE}
    outcomes = {"ok": 0, "error": 0}
    for key in _fuzz_keys():
        for value in BAD_VALUES:
            from sim.config import Overrides
            try:
                cfg = load_config(with_shape if key.startswith("model_shape") else raw,
                                  Overrides({key: value}, origin="--set"))
            except KvsimError as exc:
                msg = str(exc)
                assert "\n" not in msg and len(msg) < 400, (key, value, msg)
                assert msg.startswith(("--set", "<config>")), (key, value, msg)
                outcomes["error"] += 1
                continue
            outcomes["ok"] += 1
            for leaf in _leaves(dataclasses.asdict(cfg)):  # whatever was accepted is finite and plausible
                assert not (isinstance(leaf, float) and not math.isfinite(leaf)), (key, value)
                assert isinstance(leaf, (bool, str)) or leaf is None or leaf not in (1e308, 2**64, -1), (key, value)
    assert outcomes["ok"] > 0 and outcomes["error"] > len(_fuzz_keys()) * 5, outcomes


def _leaves(d):
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]
