#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs trainjob into it with the given extras.
# Usage: bash scripts/install.sh worker,embedded
# Skips the install when .venv already holds one of the same pyproject.toml, extras and
# TORCH_REQUIREMENT (a stamp in .venv, written after a successful install): the package is
# installed editable, so code changes need no reinstall. Remove .venv to force one.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=${1:-worker,embedded}
PYTHON=${PYTHON:-python3}
# A plain `torch` requirement would pull the newest (multi-GB, CUDA) build; pinning
# installs the tested version (on CI machines, a CPU build from local disk).
# Override with e.g. TORCH_REQUIREMENT="torch>=2.6".
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}

# One stamp per set of extras, so that serve.sh (worker,embedded) and test.sh (dev) do
# not undo each other's.
STAMP=".venv/.trainjob-installed-${EXTRAS//[^A-Za-z0-9_-]/_}"
WANTED=$(printf '%s\n' "$EXTRAS" "$TORCH_REQUIREMENT" | cat - pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ]; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
rm -f "$STAMP"
.venv/bin/python -m pip install --quiet --upgrade pip
if [[ ",$EXTRAS," == *",worker,"* || ",$EXTRAS," == *",dev,"* ]]; then
  .venv/bin/python -m pip install --quiet "$TORCH_REQUIREMENT"
fi
.venv/bin/python -m pip install --quiet --editable ".[$EXTRAS]"
echo "$WANTED" > "$STAMP"
