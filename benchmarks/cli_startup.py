"""How long ``crossling`` takes to answer before doing any work.

Times, in one run, the bare interpreter (``python -c pass``), ``crossling --help`` (the command list,
which imports neither torch nor Lightning), ``import torch``, and ``crossling fit --help`` (the
LightningCLI's own help, which must import the model and the datamodules), each the median of
``--repeat`` fresh processes, and prints each as seconds and as a multiple of the bare interpreter.

    python benchmarks/cli_startup.py [--repeat 5]

Run it on a quiet machine: a start-up time is mostly reading and compiling modules, which anything else
running slows down.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def time_command(command: list[str], repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` fresh runs (after one untimed run that warms the file cache)."""
    subprocess.run(command, cwd=REPO, capture_output=True, check=True)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "crossling --help": [python, "-m", "lightning_modules.main", "--help"],
        "import torch": [python, "-c", "import torch"],
        "crossling fit --help": [python, "-m", "lightning_modules.main", "fit", "--help"],
    }
    bare = None
    print(f"{'command':24s} {'seconds':>8s} {'x bare python':>14s}")
    for name, command in commands.items():
        seconds = time_command(command, args.repeat)
        bare = bare or seconds
        print(f"{name:24s} {seconds:8.2f} {seconds / bare:14.1f}", flush=True)


if __name__ == "__main__":
    main()
