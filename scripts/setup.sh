#!/usr/bin/env bash
# Create .venv (if missing) and install autocomp with its test extra. Idempotent; offline-safe as
# long as PyPI is reachable. The CPU build of torch is pinned first so that pip does not pull a
# multi-GB CUDA build. With --llama-cpp, also llama-cpp-python (compiled from source, 10-15 minutes
# on 2 cores the first time; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
if [ "${1:-}" = "--llama-cpp" ] && ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  .venv/bin/pip install -q -e ".[llamacpp]"
fi
