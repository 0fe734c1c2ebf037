#!/usr/bin/env bash
# Create .venv and install saeflow into it. torch is pinned and installed first: on these machines
# torch==2.13.0 is a CPU build on local disk, and letting a resolver pick torch pulls a multi-GB CUDA build.
# Set SAEFLOW_TORCH to install a different torch spec (e.g. "torch" on a GPU box with internet).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${SAEFLOW_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo "saeflow installed in $(pwd)/.venv"
