#!/usr/bin/env bash
# Developer build: compile the native modules into build/dev and drop them next to the Python
# sources so `PYTHONPATH=$PWD python ...` imports them. Users install with `pip install .`.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/dev}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DHYBRID_KERNELS_CUDA=${HYBRID_KERNELS_CUDA:-OFF} \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$BUILD_DIR" -j"${JOBS:-2}"
# INSTALL=1 copies the modules next to the Python sources (PYTHONPATH=$PWD then imports them).
if [ "${INSTALL:-0}" = 1 ]; then
  cp "$BUILD_DIR"/_C_cpu*.so hybrid_kernels/
  if ls "$BUILD_DIR"/_C_cuda*.so >/dev/null 2>&1; then cp "$BUILD_DIR"/_C_cuda*.so hybrid_kernels/; fi
fi
