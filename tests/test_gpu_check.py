"""``scripts/gpu_check.sh`` before a GPU comes: on a machine without CUDA it stops at once with one line
saying so (exit 2), and its CUDA-against-CPU tests run here with the CPU standing in for the device, so
the check's own code works when a GPU is at hand."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO, cli_env


def test_without_cuda_the_check_is_one_clear_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=cli_env(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: no CUDA device: torch "), lines
    assert "run this on a machine with an NVIDIA GPU" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the check could run


def test_a_missing_python_is_named_in_one_line():
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=cli_env(PYTHON="python3-no-such"))
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.strip() == ("gpu_check: error: no Python named 'python3-no-such' here; set PYTHON to the one "
                                   "whose torch has CUDA")


def test_the_device_tests_pass_with_the_cpu_standing_in():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/device"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=cli_env(CROSSLING_CHECK_DEVICE="cpu"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "\n5 passed" in done.stdout, done.stdout[-1000:]  # every check ran, none skipped
