#!/usr/bin/env bash
# Create a virtual environment and install hybrid-kernels into it from this checkout.
# Usage: bash scripts/install.sh [EXTRAS]   (default extras: everything the tests use)
# Builds the C++ CPU module, and the CUDA module too when a CUDA toolkit (nvcc) is found.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HK_VENV:-.venv}
EXTRAS=${1:-test,hf,retrieval,triton,bench,serve,domains}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU wheel: a bare `torch` would pull a multi-GB CUDA build.
python -m pip install -q -r requirements/cpu.txt
python -m pip install -q ".[${EXTRAS}]"
(cd / && python -c "import hybrid_kernels as hk, hybrid_kernels._C_cpu as c; print('hybrid_kernels', hk.__version__, 'CPU ISA:', c.selected_isa())")
