"""A disk that fills mid-write: one line naming the file, a non-zero exit, no half-written file, and the
next run resumes. The full disk is real to the process: its file-size limit (RLIMIT_FSIZE) makes the
kernel refuse writes past it (EFBIG), as a full file system refuses them (ENOSPC)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

from helpers import REPO, cli_env, run_crossling, tiny_fit_args

from callbacks.checkpoints import list_checkpoints


def limited(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_limited(code: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limited(limit))


def test_an_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    done = run_limited(
        "import sys\nfrom analysis.atomic import DiskFullError, write_text_atomic\n"
        f"try:\n    write_text_atomic({str(target)!r}, 'x' * 100_000)\n"
        "except DiskFullError as err:\n    print(err)\n    sys.exit(3)\n", limit=10_000)
    assert done.returncode == 3, done.stderr
    assert str(target) in done.stdout and "no space left" in done.stdout
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_sketch_file_that_cannot_be_reserved_fails_at_once_and_leaves_nothing(tmp_path):
    target = tmp_path / "train.npy.partial"
    done = run_limited(
        "import sys\nfrom pathlib import Path\nfrom analysis.atomic import DiskFullError\n"
        "from callbacks.sketch_writer import allocated_memmap\n"
        f"try:\n    allocated_memmap(Path({str(target)!r}), 'float32', (1000, 64))\n"
        "except DiskFullError as err:\n    print(err)\n    sys.exit(3)\n", limit=50_000)
    assert done.returncode == 3, done.stderr
    assert str(target) in done.stdout and not list(tmp_path.iterdir())


def test_a_fit_on_a_full_disk_says_so_in_one_line_and_the_next_run_completes(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_fit_args(run_dir)
    full = subprocess.run([sys.executable, "-m", "lightning_modules.main", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limited(200_000))
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("crossling: error: no space left to write ") and "checkpoints" in last, last
    assert not list(run_dir.rglob("*.tmp*")) and not list_checkpoints(run_dir)
    again = run_crossling(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [epoch for epoch, _ in list_checkpoints(run_dir)] == [0, 1]
