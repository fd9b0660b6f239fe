"""The command's front door: ``crossling --help`` names every command a user has, and answers without
importing torch or Lightning (whose import alone takes seconds: ``benchmarks/cli_startup.py`` times it)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, cli_env


def crossling(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_modules.main", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_the_cli_accepts():
    from lightning_modules.cli import CrosslingCLI
    from lightning_modules.main import COMMANDS

    accepted = set(CrosslingCLI.subcommands()) | {"study", "report"}
    assert set(COMMANDS) == accepted
    for flag in ([], ["--help"], ["-h"]):
        done = crossling(*flag)
        assert done.returncode == 0, done.stderr
        listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
        assert listed == accepted, (flag, done.stdout)


def test_help_imports_neither_torch_nor_lightning():
    probe = ("import sys\nfrom lightning_modules.main import main\nmain(['--help'])\n"
             "heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'transformers', 'numpy') "
             "if m in sys.modules)\nassert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fit" in done.stdout


def test_an_unknown_command_is_one_line_naming_the_commands():
    done = crossling("fitt", "--config", "x.yaml")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "'fitt'" in done.stderr and "study" in done.stderr


def test_report_without_a_study_is_one_line(tmp_path):
    done = crossling("report", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(tmp_path) in done.stderr
