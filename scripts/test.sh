#!/usr/bin/env bash
# Installs everything into ./.venv and runs lint, type checks and the whole test suite.
# Needs PostgreSQL and Redis on 127.0.0.1 (see README). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
