#!/usr/bin/env bash
# The main job (README): fresh venv, install from this checkout, then the short default benchmark
# sweep of hk.attention against SDPA, FlexAttention and the reference on this machine. Ends with
# the table and the paths of the CSV, JSON and PNG it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "bench"
# shellcheck disable=SC1091
. "${HK_VENV:-.venv}/bin/activate"
hybrid-kernels bench --quick "$@"
