#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs trainjob into it with the given extras.
# Usage: bash scripts/install.sh worker,embedded
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=${1:-worker,embedded}
PYTHON=${PYTHON:-python3}
# A plain `torch` requirement would pull the newest (multi-GB, CUDA) build; pinning
# installs the tested version (on CI machines, a CPU build from local disk).
# Override with e.g. TORCH_REQUIREMENT="torch>=2.6".
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [[ ",$EXTRAS," == *",worker,"* || ",$EXTRAS," == *",dev,"* ]]; then
  .venv/bin/python -m pip install --quiet "$TORCH_REQUIREMENT"
fi
.venv/bin/python -m pip install --quiet --editable ".[$EXTRAS]"
