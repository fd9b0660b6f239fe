"""Atomic writes leave nothing behind: a failed write removes its temporary file, and what a killed
writer left is recognised and swept before its stage runs again (the resumable partial files are not)."""

from __future__ import annotations

import pytest

from analysis.atomic import atomic_write, remove_temporaries, temporary_name, write_json_atomic


def test_a_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(ZeroDivisionError), atomic_write(target) as f:
        f.write("half")
        raise ZeroDivisionError("a write that fails half-way")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_sweep_removes_what_writers_leave_and_keeps_what_resumes(tmp_path):
    run = tmp_path / "run"
    left = [temporary_name(run / "report" / "figure.png"), temporary_name(run / "checkpoints" / "epoch=0.ckpt"),
            run / "checkpoints" / "last.ckpt.tmp"]
    kept = [run / "sketches" / "epoch=0" / "full" / "train.npy.partial", run / "sketches" / "train.partial.json",
            run / "report" / "notes.tmp.txt", run / "checkpoints" / "epoch=0.ckpt"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    write_json_atomic(run / "report" / "items.json", {"a": 1})
    assert sorted(remove_temporaries(run)) == sorted(left)
    assert all(p.is_file() for p in kept) and not any(p.exists() for p in left)
    assert remove_temporaries(tmp_path / "absent") == []


def test_every_planned_stage_names_the_folder_it_writes(tmp_path):
    from lightning_modules.study import load_study_config, plan_stages, stage_folder
    from tests.test_study import write_study

    cfg, base = load_study_config(write_study(tmp_path, tmp_path / "runs", seeds=[0, 1], counterfactual=["en"]))
    for stage in plan_stages(cfg, base):
        folder = stage_folder(stage)
        assert folder.is_relative_to(tmp_path / "runs"), (stage.name, folder)
        assert folder.name in ("report", "full", "sft", "sft-random0", "without-en", "without-random"), folder
