#!/usr/bin/env bash
# Installs trainjob into ./.venv (only when pyproject.toml or the extras changed since
# the last install, see install.sh) and starts the service on embedded defaults
# (SQLite and a private Redis under ./.trainjob). Arguments go to `trainjob serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh worker,embedded
exec .venv/bin/trainjob serve "$@"
