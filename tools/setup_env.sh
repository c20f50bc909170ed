#!/usr/bin/env bash
# Creates .venv (or $VENV) with the CPU build of torch and megatron-copsd plus its test extra.
# Usage: bash tools/setup_env.sh            (idempotent; safe to re-run)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU wheel first: a bare `torch` requirement would pull the multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "environment ready: $VENV"
