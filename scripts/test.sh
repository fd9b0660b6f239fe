#!/usr/bin/env bash
# The test command: set everything up, lint, build the docs strictly (a broken link fails), run the whole
# suite on the CPU. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
site_dir=$(mktemp -d)
trap 'rm -rf "$site_dir"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site_dir"
python -m pytest -q "$@"
