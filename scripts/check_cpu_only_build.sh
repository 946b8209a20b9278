#!/usr/bin/env bash
# The CPU-only build must work on a machine without a CUDA toolkit: configure and build with
# every directory holding nvcc removed from PATH, and check that no CUDA module was attempted.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/cpu-only-check}
clean_path=$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd: -)
rm -rf "$BUILD_DIR"
env -u CUDACXX -u CUDA_HOME PATH="$clean_path" cmake -S . -B "$BUILD_DIR" -G Ninja \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" | tee "$BUILD_DIR.log"
grep -q "no CUDA toolkit found, building the CPU module only" "$BUILD_DIR.log"
env PATH="$clean_path" cmake --build "$BUILD_DIR" -j"${JOBS:-2}"
ls "$BUILD_DIR"/_C_cpu*.so >/dev/null
if ls "$BUILD_DIR"/_C_cuda*.so >/dev/null 2>&1; then echo "CUDA module built without nvcc?" >&2; exit 1; fi
echo "CPU-only build without nvcc: OK"
