#!/usr/bin/env bash
# Installs everything into ./.venv and runs lint, type checks and the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k window -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A plain `torch` requirement pulls a multi-GB CUDA build; the pinned version is the
# CPU build CI installs from local disk. Override with TORCH_REQUIREMENT if you like.
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_REQUIREMENT"
.venv/bin/python -m pip install --quiet --editable ".[dev]"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
