"""Each study stage in its own process: ``crossling <stage arguments>`` as a child of the study runner.

Why a child and not a call: a stage's memory (a model, exact gradients, the allocator's free lists)
goes back to the system when the stage ends, so the study's peak is its largest stage's, not their sum;
the child's own peak resident memory is measured (``wait4``) and recorded beside its time; and a stage
killed from outside (the kernel's out-of-memory killer, ``kill -9``) is reported as such, in one line,
instead of taking the runner down without a word. Every stage writes atomically and resumes, so a
stopped child is rerun by running the same study command again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


class StageFailed(RuntimeError):
    """A stage's process ended without success; ``exit_code`` is what the study itself exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StageRun:
    seconds: float
    peak_bytes: int  # the child's peak resident memory


def _die_with_parent() -> None:
    """In the child, before it runs: on Linux, ask to be killed when the runner dies, so a runner killed
    with SIGKILL never leaves a stage writing beside the next run's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a killed runner's stage finishes on its own


def run_stage_process(stage: str, arguments: list[str]) -> StageRun:
    """Run ``crossling <arguments>`` in a child process and wait for it; SIGTERM to the runner is passed
    on to the child (which stops as a resumable stage does) and Ctrl-C reaches it from the terminal."""
    argv = [sys.executable, "-m", "lightning_modules.main", *arguments]
    start = time.monotonic()
    child = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the child
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    code = child.returncode
    if code == 0:
        return StageRun(seconds, peak)
    if code < 0:
        name = signal.Signals(-code).name
        hint = (" (the system's out-of-memory killer sends it: see docs/measurements.md, 'Memory, disk, and a "
                "study stopped anywhere')" if -code == 9 else "")
        raise StageFailed(f"crossling study: stage {stage} was killed by {name}{hint} after {seconds:.0f} s, at "
                          f"{peak / 2**30:.1f} GiB resident; run the same command again to resume", 128 - code)
    if code == 2:  # a user's error: the stage has said what, in one line
        raise StageFailed(f"crossling study: stage {stage} stopped (exit status 2, above)", 2)
    if code == 128 + signal.SIGTERM:
        raise StageFailed(f"crossling study: stopped during stage {stage}; run the same command again to resume",
                          code)
    raise StageFailed(f"crossling study: stage {stage} failed with exit status {code} (its error is above); "
                      "run the same command again to retry it", 1)
