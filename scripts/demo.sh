#!/usr/bin/env bash
# The main job: set everything up, then run the demo study (tiny model, bundled binary XNLI data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
crossling study --config configs/demo/xnli.yaml "$@"
