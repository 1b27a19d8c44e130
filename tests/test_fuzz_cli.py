"""A fixed sample of bench/fuzz_cli.py's cases, in process: a bad value on the command line or in a file
is exit 2 with one stderr line (no traceback, no silent acceptance); a legal one runs (exit 0).

The wide version (every config leaf x every bad value, every argument, in subprocesses with timeouts)
is `python bench/fuzz_cli.py --jobs 2`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import fuzz_cli  # noqa: E402

from sim.cli import main  # noqa: E402

# Cases of files owned by other branches that fail today (bench/fuzz_cli.py lists them with the command
# line): the in-process sample keeps to the commands whose parsing lives in sim/cli.py and sim/config.py.
IN_PROCESS_GROUPS = ("run", "config", "cli", "report")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return fuzz_cli.make_fixtures(tmp_path_factory.mktemp("fixtures"))


def run_cli(argv, tmp: Path, capsys) -> tuple[int, list[str]]:
    """kvsim's exit status and stderr lines for `argv` ({tmp} replaced by a fresh folder holding `afile`)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "afile").write_text("x\n")
    args = [os.fsdecode(a.replace(b"{tmp}", str(tmp).encode())) if isinstance(a, bytes)
            else a.replace("{tmp}", str(tmp)) for a in argv]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _leaf_sample():
    """One bad value per config leaf (rotating through the fuzzed values), on default.yaml."""
    leaves = fuzz_cli.config_leaves()
    out = []
    for i, (key, meta, tp) in enumerate(leaves):
        label, text = fuzz_cli.LEAF_VALUES[(i * 7) % len(fuzz_cli.LEAF_VALUES)]
        out.append(pytest.param(key, label, text, id=f"{key}={label}"))
    return out


@pytest.mark.parametrize("key, label, text", _leaf_sample())
def test_a_config_leaf_set_to_a_bad_value_is_one_line_naming_it_or_runs_if_legal(key, label, text, fixtures,
                                                                                  tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    case = next(c for c in fuzz_cli.leaf_cases("configs/default.yaml", str(fixtures["tiny_trace"]))
                if c.what == f"{key}={label}")
    code, lines = run_cli(case.argv, tmp_path, capsys)
    if not case.bad:
        assert code == 0, lines
        return
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("kvsim: error: --set "), lines
    top = key.split(".")[0]
    assert f"--set {top}" in lines[0] or "model" in lines[0], lines  # names the key (or the model it shapes)


def _arg_sample():
    import tempfile
    cases = fuzz_cli.arg_cases(fuzz_cli.make_fixtures(Path(tempfile.mkdtemp(prefix="kvsim-fuzz-ids-"))))
    return [pytest.param(i, id=f"{c.group}:{c.what}") for i, c in enumerate(cases) if c.group in IN_PROCESS_GROUPS]


@pytest.mark.parametrize("i", _arg_sample())
def test_a_bad_argument_is_one_line_exit_2_and_a_legal_one_runs(i, fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    case = fuzz_cli.arg_cases(fixtures)[i]
    code, lines = run_cli(case.argv, tmp_path, capsys)
    if not case.bad:
        assert code == 0, lines
        return
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines


def test_empty_or_repeated_compare_and_empty_out_are_refused_before_running(fixtures, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = str(fixtures["tiny_config"])
    for args, fragment in ((["--compare", ""], "--compare '': '': expected policies from"),
                           (["--compare", "recompute,recompute"], "a policy given twice"),
                           (["--out", ""], "--out '': expected a folder")):
        code, lines = run_cli(["run", cfg, *args], tmp_path, capsys)
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "results").exists()  # '' used to mean the default folder, silently


def test_an_out_folder_the_filesystem_or_parquet_cannot_take_is_one_line(fixtures, tmp_path, capsys):
    cfg = str(fixtures["tiny_config"])
    code, lines = run_cli(["run", cfg, "--out", str(tmp_path / ("x" * 300))], tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and "File name too long" in lines[0], lines
    code, lines = run_cli([b"run", cfg.encode(), b"--out", str(tmp_path).encode() + b"/\xff"], tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and "not valid UTF-8" in lines[0], lines


# Each of these was a traceback, a hang or a silent acceptance of `kvsim sweep|plan|trace|plot` before the
# bounded argument types (sim/argtypes.py), the planner's own checks and the trace readers' checks; all are
# refused before anything runs, so they are fast in process.
REFUSED_BEFORE_RUNNING = [
    ("sweep", "--jobs 18446744073709551616"), ("sweep", "--jobs 0"), ("sweep", "--ray ''"),
    ("plan", "--slo 'ttft_p99_ms<=-1'"), ("plan", "--slo 'ttft_p99_ms<=1e308'"), ("plan", "--gpus ''"),
    ("plan", "--gpus '99999'"), ("plan", "--gpus '1,,2'"),
    ("plan", "--dram-min '1e-300'"), ("plan", "--dram-max '1e-300'"), ("plan", "--dram-max '1e308'"),
    ("plan", "--dram-step '1e308'"), ("plan", "--dram-step '18446744073709551616'"), ("plan", "--dram-step '20PB'"),
    ("plan", "--dram-step '1e-300'"), ("plan", "--dram-step '1'"),
    ("plan", "--ssd-max '1e308'"), ("plan", "--ssd-max '18446744073709551616'"), ("plan", "--ssd-max '1e-300'"),
    ("plan", "--ssd-max '20PB'"), ("plan", "--ssd ''"), ("plan", "--ssd '20PB'"),
    ("plan", "--set 'host.dram_bytes=1GB' (plan owns dram)"), ("plan", "--jobs '18446744073709551616'"),
    ("plan", "--jobs '0'"), ("plan", "--rate '1e308'"),
    ("trace", "sharegpt --sample '18446744073709551616'"), ("trace", "sharegpt --seed '18446744073709551616'"),
    ("trace", "sharegpt --seed '-1'"), ("trace", "sharegpt --seed ''"),
    ("trace", "sharegpt --session-rate '1e308'"), ("trace", "sharegpt --session-rate '18446744073709551616'"),
    ("trace", "sharegpt --think-mean '1e308'"), ("trace", "sharegpt --think-mean '18446744073709551616'"),
    ("trace", "sharegpt --input=dir"), ("trace", "sharegpt --input=deep_yaml"), ("trace", "sharegpt --input=parquet"),
    ("trace", "mooncake --min-blocks '18446744073709551616'"),
    ("trace", "synth --rate '1e308'"), ("trace", "synth --rate '18446744073709551616'"),
    ("trace", "synth --think-mean '1e-300'"), ("trace", "synth --prompt-scale '1e-300'"),
    ("trace", "synth --output-scale '1e-300'"), ("trace", "synth --seed '18446744073709551616'"),
    ("trace", "synth --seed '-1'"), ("trace", "synth --sessions '18446744073709551616'"),
    ("trace", "synth --spec=dir"), ("trace", "synth --spec=nonutf8"), ("trace", "synth --spec=binary"),
    ("trace", "synth --spec=parquet"), ("trace", "synth --spec=truncated_parquet"),
    ("trace", "synth --spec=garbage_parquet"), ("trace", "synth --spec=deep_yaml"),
    ("trace", "synth --png=out_file"), ("trace", "stats --json=out_file"),
    ("plot", "plot results=empty_points"),
]


@pytest.mark.parametrize("group, what", [pytest.param(g, w, id=f"{g}:{w}") for g, w in REFUSED_BEFORE_RUNNING])
def test_a_bad_sweep_plan_trace_or_plot_argument_is_one_line_exit_2(group, what, fixtures, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(ROOT)
    case = next(c for c in fuzz_cli.arg_cases(fixtures) if c.group == group and c.what == what)
    assert case.bad
    code, lines = run_cli(case.argv, tmp_path, capsys)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("kvsim"), lines
    assert not (tmp_path / "t.parquet").exists()
