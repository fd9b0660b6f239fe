#!/usr/bin/env bash
# The test command: set everything up, lint, run the whole suite on the CPU. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
