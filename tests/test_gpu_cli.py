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
