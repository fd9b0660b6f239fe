"""How crossling's processes hand memory back to the system (glibc's allocator; elsewhere nothing happens).

Standard library only: ``main.py`` imports it before deciding whether a command needs torch at all.
"""

from __future__ import annotations

import gc
import os
import sys

MMAP_THRESHOLD = 4 * 2**20


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at 4 MiB: blocks that large get their own mapping, returned when freed.

    By default the threshold climbs with the largest block freed (up to 32 MiB), after which the tensors of
    varying shape a fit allocates per batch come from the heap, whose holes are seldom returned. Measured
    on 60 e5-small training batches (2 cores, one fit each, wall time with start-up): glibc's default
    39.0 s, peak 3.56 GB; 4 MiB 37.6 s, 3.30 GB; 1 MiB 41.5 s, 3.05 GB; 64 KiB 58.3 s, 2.58 GB (every
    mid-sized tensor a fresh mapping: page faults cost half again the time); malloc_trim every 10 steps
    37.9 s, 3.16 GB. ``MALLOC_MMAP_THRESHOLD_`` in the environment, if set, wins."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def release_freed_memory() -> None:
    """Collect garbage and return the allocator's free pages to the system: between the stages one
    ``analyze`` runs in a process, so the next stage starts from what is still in use."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
