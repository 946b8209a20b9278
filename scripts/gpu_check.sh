#!/usr/bin/env bash
# The prepared GPU check: install on a GPU machine, run the GPU correctness tests, a
# compute-sanitizer memcheck of a few small cases and the GPU benchmarks, each step under its own
# time limit, and print one summary table. On an H200 it took 28 s to install, 121 s for the tests
# (one config per kernel key, HK_TRITON_AUTOTUNE=0), up to 90 s memcheck and 320 s benchmarks
# (FlexAttention's compiles take most of it): about 9 minutes. Logs go to $OUT (default out/gpu_check). Run it from the repository root:
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
unset TRITON_INTERPRET
SUMMARY=()
PY=$(command -v python || command -v python3)

step() {  # step NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local status=ok
  [ "$rc" -eq 124 ] && status="timeout (${limit}s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAILED (rc $rc)"
  local last
  last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-90)
  SUMMARY+=("$(printf '%-12s %-18s %5ss  %s' "$name" "$status" "$took" "$last")")
  return 0
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -n 1;
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  >"$OUT/device.txt" 2>&1
# Hopper only (the default also builds sm_80), and no dependency resolution: the machine is offline.
step install 180 env CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
# Every failure, not the first: one lease has to show them all, written as they happen (the
# step may hit its limit). The interpreter children are CI's.
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 16)
"$PY" -c "import pytest_timeout" 2>/dev/null && XDIST+=(--timeout 120)
step tests 240 env PYTHONPATH=scripts HK_TRITON_AUTOTUNE=0 HK_FAILURE_LOG="$OUT/failures.log" "$PY" -m pytest -q \
  -p no:cacheprovider -p pytest_failure_log "${XDIST[@]}" -rf --tb=short \
  -k "not test_interpreter_runs" tests/test_cuda.py tests/test_triton.py tests/test_score_mods_triton.py
if [ "${GPU_CHECK_TESTS_ONLY:-0}" != 1 ]; then  # GPU_CHECK_TESTS_ONLY=1: install and tests only
  if command -v compute-sanitizer >/dev/null; then
    # One Triton config per kernel: every autotuned config would be compiled under the sanitizer.
    step memcheck 90 env HK_TRITON_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PY" scripts/gpu_sanitize_cases.py
  else
    step memcheck 90 env HK_TRITON_AUTOTUNE=0 "$PY" scripts/gpu_sanitize_cases.py  # without the sanitizer: results only
  fi
  step bench_triton 200 "$PY" bench/bench_triton_gpu.py --n 16384 65536 --d 64 --reps 3
  step bench_cuda 120 "$PY" bench/bench_cuda_gpu.py --n 16384
fi

echo "== GPU check ($(head -n 2 "$OUT/device.txt" | tail -n 1))"
printf '%-12s %-18s %6s  %s\n' step status time "last line of the log ($OUT/STEP.log)"
for row in "${SUMMARY[@]}"; do echo "$row"; done
grep -q "FAILED\|timeout" <<<"${SUMMARY[*]}" && exit 1
exit 0
