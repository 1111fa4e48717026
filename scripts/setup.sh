#!/usr/bin/env bash
# Create .venv (if needed) and install instructrl with its test extras.
# Where no torch is installed, the CPU build torch==2.13.0 goes in first (an unpinned torch pulls a multi-GB
# CUDA build); a venv that already has torch, e.g. a CUDA build on a GPU machine, keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --retries 0 --timeout 10 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
