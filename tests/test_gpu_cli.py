"""`kvsim gpu ...`: user errors are one line and exit code 2; CUDA-only commands refuse cleanly."""
import subprocess
import sys

import pytest
import torch


def _kvsim(*args):
    return subprocess.run([sys.executable, "-m", "sim.cli", "gpu", *args], capture_output=True, text=True)


def test_validate_with_a_missing_measurement_file_is_one_line_exit_2(tmp_path):
    r = _kvsim("validate", "--measured", str(tmp_path / "nope.csv"), "--out", str(tmp_path))
    assert r.returncode == 2
    assert "nope.csv" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_calibrate_without_cuda_says_so_and_exits_2(tmp_path):
    r = _kvsim("calibrate", "--out", str(tmp_path / "x.yaml"))
    assert r.returncode == 2 and "CUDA" in r.stderr and "Traceback" not in r.stderr


def test_gpu_and_roundattn_are_registered_as_entry_points_of_the_kvsim_commands_group():
    from sim.plugins import command_entry_points

    found = command_entry_points()
    assert found["gpu"] == "gpu.cli:register" and found["roundattn"] == "gpu.roundattn.cli:register"


def _fake_entry_point(monkeypatch, tmp_path, module, source):
    import importlib.metadata

    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("fake", f"{module}:register", "kvsim.commands")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "kvsim.commands" else real(**kw))


def test_a_plugin_declared_as_an_entry_point_adds_its_subcommand(monkeypatch, tmp_path, capsys):
    from sim.cli import main

    _fake_entry_point(monkeypatch, tmp_path, "kvsim_fake_plugin", (
        "def register(sub):\n"
        "    p = sub.add_parser('fake')\n"
        "    p.set_defaults(func=lambda args: print('fake ran') or 0)\n"))
    assert main(["fake"]) == 0
    assert capsys.readouterr().out == "fake ran\n"


def test_a_plugin_missing_a_dependency_leaves_run_working_and_says_so_when_called(monkeypatch, tmp_path, capsys):
    from sim.cli import build_parser, main

    _fake_entry_point(monkeypatch, tmp_path, "kvsim_fake_broken_plugin", "import kvsim_no_such_dependency\n\ndef register(sub):\n    pass\n")
    args = build_parser().parse_args(["run", "configs/default.yaml"])
    assert args.command == "run"
    assert main(["fake", "--anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "kvsim fake: kvsim_fake_broken_plugin cannot be imported" in err and "kvsim_no_such_dependency" in err


def test_sim_never_imports_gpu():
    import ast
    from pathlib import Path

    offenders = []
    for path in Path("sim").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path}: {n}" for n in names if n == "gpu" or n.startswith("gpu.")]
    assert offenders == []


def test_execute_names_the_bad_model_before_asking_for_a_gpu(tmp_path):
    r = _kvsim("execute", "--model", "tiny", "--trace", "t.parquet", "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 2
    assert r.stderr.strip() == "kvsim: error: --model: 'tiny', expected one of llama2-7b, llama2-13b, llama3.1-8b"


@pytest.mark.parametrize("args", [
    ["calibrate", "--out", "{dir}"],
    ["calibrate", "--out", "{dir}/p.yaml", "--raw", "{file}/raw.json"],
    ["execute", "--model", "llama2-7b", "--trace", "t.parquet", "--out", "{dir}"],
    ["validate", "--out", "{file}"],
])
def test_an_output_that_cannot_be_written_is_one_line_exit_2_before_any_work(args, tmp_path):
    # before the CUDA check (calibrate, execute) and before reading the measurements (validate)
    (tmp_path / "f").write_text("")
    r = _kvsim(*(a.format(dir=tmp_path, file=tmp_path / "f") for a in args))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    flag = "--raw" if "--raw" in args else "--out"
    assert r.stderr.startswith(f"kvsim: error: {flag} {tmp_path}")
    assert "CUDA" not in r.stderr and "not found" not in r.stderr
