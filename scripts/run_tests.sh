#!/usr/bin/env bash
# The test command (README): fresh venv, install from this checkout, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. "${HK_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# `pytest` (not `python -m pytest`) so the source tree is not on sys.path: the tests import the
# installed package, compiled modules included.
pytest -ra --durations=15 "$@"
