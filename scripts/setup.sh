#!/usr/bin/env bash
# Sets up a fresh machine for avpea-ray: a virtual environment in .venv with the locked
# dependencies and the project installed in editable mode (with the test extras).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "[setup] installing locked dependencies (first run takes a few minutes)"
# PIP_FIND_LINKS is cleared so that a local CPU-only torch wheel cannot mix with the
# registry's torchvision/torchaudio builds, which need the registry's torch.
PIP_FIND_LINKS= .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --constraint requirements.lock --editable ".[test]"
.venv/bin/python -c "import torch, timm, ray, mlflow, webdataset; print(f'[setup] ok: torch {torch.__version__}, timm {timm.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}')"
