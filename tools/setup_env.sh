#!/usr/bin/env bash
# Create the virtual environment: torch first (CPU build unless an NVIDIA GPU is present, so a
# CPU machine never pulls CUDA wheels), then the tested pins (requirements-ci.txt: exact versions
# meeting requirements.txt's lower bounds, plus the test-only packages), then nblib (editable).
set -euo pipefail
venv=${1:-.venv}
here=$(dirname "$0")
quiet() { bash "$here/quiet.sh" "$@"; }  # output only on failure
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "setting up $venv: torch, the tested packages (requirements-ci.txt) and nblib (downloads the first time)"
python3 -m venv "$venv"
quiet "$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # A torch 2.13.0 wheel already on disk (pip's find-links) wins; otherwise the CPU index, or
  # the default (CUDA) build when an NVIDIA GPU is present.
  if "$venv/bin/pip" install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
    quiet "$venv/bin/pip" install -q torch==2.13.0
  elif command -v nvidia-smi >/dev/null 2>&1; then
    quiet "$venv/bin/pip" install -q torch==2.13.0
  else
    quiet "$venv/bin/pip" install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
quiet "$venv/bin/pip" install -q -r requirements-ci.txt
quiet "$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import torch, nblib; print(f'torch {torch.__version__}, cuda {torch.cuda.is_available()}, nblib {nblib.__version__}')"
