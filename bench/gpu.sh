#!/usr/bin/env bash
# The GPU kit (issue 15): on a GPU machine with only this repository, installs what it
# needs into ./.venv (scripts/install.sh with the dev and cuda extras: torch, accelerate,
# Lightning, pytest, and bitsandbytes for the lane's quantize and adamw8bit tests) and
# runs bench/gpu.py: the CUDA test lane, training throughput, memory and dispatch, each
# bounded in time; one Markdown report, printed, and a summary at the end.
# Unattended: nothing reads stdin, pip never prompts.
#   bash bench/gpu.sh                    # on a GPU machine
#   bash bench/gpu.sh --dry-run          # on CPU: every part at toy size; installs nothing
# Other arguments go to bench/gpu.py (--report PATH, --only PART..., --timeout PART=SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ " $* " == *" --dry-run "* ]]; then
  # CI's .venv as it is (scripts/test.sh installed it): nothing new.
  if [ ! -x .venv/bin/python ]; then
    echo "bench/gpu.sh --dry-run: no .venv here; run bash scripts/install.sh dev first" >&2
    exit 2
  fi
else
  # Whatever pip's torch is on this machine (on Linux a CUDA build), within pyproject's
  # range; not install.sh's default, the version CI pins to a CPU wheel on its own disk.
  started=$SECONDS
  TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-"torch>=2.6,<3"} \
    timeout --kill-after=10 900 bash scripts/install.sh dev,cuda < /dev/null
  echo "install: $((SECONDS - started)) s"
fi
exec .venv/bin/python bench/gpu.py "$@" < /dev/null
