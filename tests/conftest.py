"""Shared fixtures. Every test runs single-threaded: the machine's cores are shared, and one
thread also makes floating-point results reproducible between a test process and the
subprocesses it starts (which get OMP_NUM_THREADS=1 from ``helpers.cli_env``).
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)

# tests/device/ compares an accelerator with the CPU: scripts/gpu_check.sh runs it with
# CROSSLING_CHECK_DEVICE=cuda, tests/test_gpu_check.py with cpu; the plain suite leaves it to them
collect_ignore = [] if os.environ.get("CROSSLING_CHECK_DEVICE") else ["device"]


@pytest.fixture(scope="session")
def small_pawsx():
    """A small PAWS-X datamodule on the bundled data (tiny tokenizer), shared read-only."""
    from helpers import small_pawsx_datamodule

    return small_pawsx_datamodule()
