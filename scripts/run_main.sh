#!/usr/bin/env bash
# The main job (README): fresh venv, install, then a short benchmark of hk.attention against
# the anchors on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "bench"
# shellcheck disable=SC1091
. "${HK_VENV:-.venv}/bin/activate"
python python/quickstart.py
