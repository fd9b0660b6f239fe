"""Shared fixtures. Every test runs single-threaded: the machine's cores are shared, and one
thread also makes floating-point results reproducible between a test process and the
subprocesses it starts (which get OMP_NUM_THREADS=1 from ``helpers.cli_env``).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_pawsx():
    """A small PAWS-X datamodule on the bundled data (tiny tokenizer), shared read-only."""
    from helpers import small_pawsx_datamodule

    return small_pawsx_datamodule()
