"""A study survives being killed anywhere: SIGKILL at random moments of its stages, then the same
command, ends with the outputs of a study that ran through (``scripts/kill_anywhere.py``, fast here);
a stage killed from outside ends the study in one line; a runner killed takes its stage with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from helpers import load_script

kill_anywhere = load_script("kill_anywhere")


def test_a_study_killed_in_its_stages_resumes_to_the_outputs_of_one_that_ran_through(tmp_path, capsys):
    assert kill_anywhere.main(["--kills", "3", "--seed", "1", "--workdir", str(tmp_path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("killed ") >= 2, out  # the kills landed (a stage may end before its moment comes)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_stage_killed_from_outside_is_named_and_a_killed_runner_takes_its_stage_along(tmp_path):
    config = kill_anywhere.write_study(tmp_path, tmp_path / "runs")
    with open(tmp_path / "log", "w") as log:
        proc = kill_anywhere.start_study(config, log)
        wait_for(lambda: children(proc.pid))
        os.kill(children(proc.pid)[0], signal.SIGKILL)  # as the out-of-memory killer would
        assert proc.wait(timeout=120) == 128 + signal.SIGKILL
    last = (tmp_path / "log").read_text().strip().splitlines()[-1]
    assert "stage full was killed by SIGKILL" in last and "run the same command again" in last, last
    with open(tmp_path / "log", "w") as log:
        proc = kill_anywhere.start_study(config, log)
        wait_for(lambda: children(proc.pid))
        stage = children(proc.pid)[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        wait_for(lambda: not Path(f"/proc/{stage}").exists() or "Z" in Path(f"/proc/{stage}/stat").read_text().split()[2],
                 seconds=30)
