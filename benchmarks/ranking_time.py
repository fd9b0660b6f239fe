"""Time of the ranking stage (exact TracIn top-m, streamed) at the paper's scale.

10,000 training × 2,500 test examples × 5 checkpoints, random float32 sketches of d = 1024
(crossling's default Kronecker sketch; ``--dims 256 4096`` for the paper's and a larger one);
m = 100 most positive and most negative, cosine normalisation, per-checkpoint rankings on (as the
stage runs by default). Prints seconds, two ratios (ranking time over the bare matrix products,
i.e. the cost of exact streaming selection; float32 over float64 arithmetic) and the process's
peak resident memory, which the streaming keeps bounded by ``--memory-mb`` plus the inputs.

    python benchmarks/ranking_time.py [--threads 2] [--dims 1024] [--stage]

``--threads`` sets the BLAS thread count (set before numpy is imported); ``--stage`` also times
``run_influence`` end to end on a temporary run directory of memory-mapped .npy files.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="BLAS threads (default 2: this machine's cores)"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[1024])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=2_500)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--memory-mb", type=float, default=1024.0)
    parser.add_argument(
        "--stage", action="store_true", help="also time run_influence on a temporary run directory"
    )
    args = parser.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if "numpy" in sys.modules:
        print("warning: numpy already imported; thread setting may not apply")

    import time

    import numpy as np

    from analysis.tracin import normalize, stream_top_k

    print(
        f"ranking: {args.n_test} test x {args.n_train} train x {args.checkpoints} checkpoints, m={args.m}, "
        f"cosine, per-checkpoint on, BLAS threads={args.threads}, memory budget {args.memory_mb:.0f} MB, "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
    )
    for d in args.dims:
        rng = np.random.default_rng(d)
        tests = [rng.standard_normal((args.n_test, d), dtype=np.float32) for _ in range(args.checkpoints)]
        trains = [rng.standard_normal((args.n_train, d), dtype=np.float32) for _ in range(args.checkpoints)]
        results = {}
        for name, dtype in (("float64", np.float64), ("float32", np.float32)):
            start = time.perf_counter()
            for t, r in zip(tests, trains):  # the bare products, no selection: the floor
                normalize(t, "cosine", "test", dtype) @ normalize(r, "cosine", "train", dtype).T
            floor = time.perf_counter() - start
            start = time.perf_counter()
            stream_top_k(tests, trains, m=args.m, memory_mb=args.memory_mb, dtype=dtype)
            results[name] = (time.perf_counter() - start, floor)
        for name, (seconds, floor) in results.items():
            print(
                f"d={d:5d} {name}: ranking {seconds:7.2f} s   matmul floor {floor:6.2f} s   ratio {seconds / floor:5.2f}"
            )
        print(
            f"d={d:5d} float32/float64 ranking time ratio {results['float32'][0] / results['float64'][0]:.2f}"
        )
        if args.stage:
            _time_stage(tests, trains, d, args)
        del tests, trains
    import resource

    inputs = args.checkpoints * (args.n_test + args.n_train) * max(args.dims) * 4 / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak resident memory {peak:.0f} MiB (the float32 inputs alone: {inputs:.0f} MiB)")


def _time_stage(tests, trains, d, args) -> None:
    """run_influence end to end (memory-mapped reads, validation, npz and csv writing, bootstrap)."""
    import json
    import tempfile
    import time
    from pathlib import Path

    import numpy as np

    from analysis.influence import InfluenceOptions, run_influence

    langs = ["en", "fr", "de", "ko", "es"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        for e, (t, r) in enumerate(zip(tests, trains)):
            for split, arr in (("test", t), ("train", r)):
                base = run / "sketches" / f"epoch={e}" / "full"
                base.mkdir(parents=True, exist_ok=True)
                np.save(base / f"{split}.npy", arr)
                n = arr.shape[0]
                meta = {
                    "format": 1,
                    "split": split,
                    "mask": "full",
                    "epoch": e,
                    "n": n,
                    "d": d,
                    "dtype": "float32",
                    "projection": {"kind": "bench"},
                    "indices": list(range(n)),
                    "ids": [str(i) for i in range(n)],
                    "langs": [langs[i * len(langs) // n] for i in range(n)],
                    "labels": [0] * n,
                    "pred": [0] * n,
                    "correct": [True] * n,
                    "languages": langs,
                }
                (base / f"{split}.json").write_text(json.dumps(meta))
        start = time.perf_counter()
        run_influence(run, ["full"], InfluenceOptions(m=args.m, memory_mb=args.memory_mb))
        print(
            f"d={d:5d} run_influence (condition full, float64, incl. I/O and bootstrap): {time.perf_counter() - start:7.2f} s"
        )


if __name__ == "__main__":
    main()
