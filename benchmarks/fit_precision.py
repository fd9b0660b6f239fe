"""What training precision costs on this CPU, and on one without native bfloat16: the demo's full
fine-tuning of multilingual-e5-small (``configs/demo/e5-xnli-full.yaml``: real weights, bundled XNLI,
batches of 16, length buckets) timed step by step under each of

  native  bf16-mixed     the CPU's own instruction set (bfloat16 dot products where it has them)
  native  32-true
  AVX2    bf16-mixed     ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: oneDNN and ATen's kernels
  AVX2    32-true        kept to AVX2, as on a CPU without AVX-512 (bfloat16 then emulated)

Each setting is a fresh ``crossling fit`` process (the caps are read when torch loads), stopped after
``--steps`` training steps; the throughput is taken after the first ``--warmup`` steps, the
peak resident memory the process's. Ratios are taken over the steps every setting ran: the same
batches in the same order (one seed), whose lengths vary with the length buckets. ``precision auto`` picks, per setting, what the last column says.

    python benchmarks/fit_precision.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # crossling, and this file as the module fit_precision
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
SETTINGS = [("native", {}, "bf16-mixed"), ("native", {}, "32-true"), ("AVX2", AVX2, "bf16-mixed"), ("AVX2", AVX2, "32-true")]


class StepTimer(pl.Callback):
    """Seconds of each training step (batch start to batch end), written to ``out`` when the fit ends."""

    def __init__(self, out: str):
        self.out, self.times = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)

    def on_fit_end(self, trainer, pl_module):
        self.out.write_text(json.dumps(self.times))


def child(precision: str, steps: int, out: Path) -> None:
    """One fit, timed step by step; writes its numbers as JSON to ``out``."""
    from lightning_modules.cli import run_cli
    from lightning_modules.precision import native_bf16_on

    times = out.with_suffix(".times.json")
    with tempfile.TemporaryDirectory() as run_dir:
        run_cli(["fit", "--config", str(REPO / "configs/demo/e5-xnli-full.yaml"),
                 "--trainer.precision", precision, "--trainer.default_root_dir", run_dir,
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
                 "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.callbacks+=fit_precision.StepTimer", f"--trainer.callbacks.out={times}"])
    native, reason = native_bf16_on("cpu")
    out.write_text(json.dumps({
        "times": json.loads(times.read_text()), "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "auto": "bf16-mixed" if native else "32-true", "reason": reason,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per setting")
    parser.add_argument("--emulated_steps", type=int, default=8, help="steps where bfloat16 is emulated (slow)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--child", nargs=3, metavar=("PRECISION", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa, env, precision in SETTINGS:
            steps = args.emulated_steps if (isa, precision) == ("AVX2", "bf16-mixed") else args.steps
            out = Path(tmp) / "out.json"
            began = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", precision, str(steps), str(out)], check=True,
                           env={**os.environ, **env, "PYTHONWARNINGS": "ignore"}, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            results[isa, precision] = result
            timed = result["times"][args.warmup:]
            print(f"{isa:6s} {precision:10s} {len(timed) / sum(timed):6.2f} it/s over {len(timed)} steps, "
                  f"peak {result['peak_kib'] / 2**20:.2f} GiB, process {time.perf_counter() - began:.0f} s; "
                  f"auto here: {result['auto']} ({result['reason']})", flush=True)
    # ratios over the same steps (the same batches: one seed, one order) in every setting
    common = min(len(r["times"]) for r in results.values())

    def seconds(key):
        return sum(results[key]["times"][args.warmup:common])

    print(f"ratios over steps {args.warmup + 1}-{common}: "
          f"native bf16/fp32 time {seconds(('native', 'bf16-mixed')) / seconds(('native', '32-true')):.2f}; "
          f"AVX2 bf16/fp32 time {seconds(('AVX2', 'bf16-mixed')) / seconds(('AVX2', '32-true')):.1f}; "
          f"AVX2 fp32 / native fp32 {seconds(('AVX2', '32-true')) / seconds(('native', '32-true')):.2f}")

if __name__ == "__main__":
    main()
