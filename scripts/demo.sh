#!/usr/bin/env bash
# The main job: set everything up, then run the demo study (multilingual-e5-small, bundled binary XNLI data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
crossling study --config configs/demo/e5-xnli.yaml "$@"
