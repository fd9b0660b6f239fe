"""Bad input gives one clear error naming the file (and line or key), what was expected and
what was found, in-process and through the ``crossling`` command (non-zero exit, message on
stderr, no traceback).
"""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from helpers import run_crossling

from callbacks.checkpoints import CheckpointError, load_checkpoint, load_weights
from datamodules import DataError, MARCDataModule, PAWSXDataModule
from datamodules.sources import read_hub, read_local


def write_lines(path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def good_pawsx_line(i: int) -> str:
    return json.dumps({"id": i, "sentence1": f"first {i}", "sentence2": f"second {i}", "label": i % 2})


def test_missing_data_directory(tmp_path):
    missing = tmp_path / "no-such-dir"
    dm = PAWSXDataModule(source="local", data_dir=str(missing), backbone="tiny-random")
    with pytest.raises(DataError, match=re.escape(f"data directory not found: {missing}")):
        dm.load_records("train")


def test_local_source_without_data_dir():
    with pytest.raises(DataError, match="needs --data.data_dir"):
        read_local("pawsx", "train", "en", None)


def test_missing_file_names_the_expected_path(tmp_path):
    write_lines(tmp_path / "pawsx" / "train" / "en.jsonl", [good_pawsx_line(0)])
    dm = PAWSXDataModule(
        languages=["en", "de"], source="local", data_dir=str(tmp_path), backbone="tiny-random"
    )
    with pytest.raises(DataError) as err:
        dm.load_records("train")
    message = str(err.value)
    assert str(tmp_path / "pawsx" / "train" / "de.jsonl") in message
    assert "language de" in message


def test_missing_hub_files_name_the_pattern(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "copy" / "en").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'copy'}/en/train-*.parquet")):
        read_hub("pawsx", "train", "en", str(tmp_path / "copy"))


def test_unknown_language_code_names_key_expected_and_found():
    with pytest.raises(DataError) as err:
        PAWSXDataModule(languages=["en", "xx"], backbone="tiny-random")
    message = str(err.value)
    assert "data.languages" in message and "'xx'" in message
    for known in ("en", "de", "es", "fr", "ko"):
        assert repr(known) in message


def test_duplicate_language_code():
    with pytest.raises(DataError, match="duplicate"):
        PAWSXDataModule(languages=["en", "en"], backbone="tiny-random")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "pawsx" / "dev" / "en.jsonl"
    write_lines(path, [good_pawsx_line(0), good_pawsx_line(1), "", '{"id": 2, "sentence1": "x",'])
    with pytest.raises(DataError, match=re.escape(f"{path}:4: malformed JSON line")):
        read_local("pawsx", "dev", "en", tmp_path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "pawsx" / "dev" / "en.jsonl"
    write_lines(path, [good_pawsx_line(0), "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object, found list")):
        read_local("pawsx", "dev", "en", tmp_path)


def test_missing_text_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "pawsx" / "test" / "fr.jsonl"
    write_lines(path, [good_pawsx_line(0), json.dumps({"id": 1, "sentence1": "a", "label": 0})])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing key 'sentence2'")):
        read_local("pawsx", "test", "fr", tmp_path)


def test_label_outside_task_set_names_file_line_expected_and_found(tmp_path):
    path = tmp_path / "pawsx" / "train" / "es.jsonl"
    write_lines(
        path, [good_pawsx_line(0), json.dumps({"id": 1, "sentence1": "a", "sentence2": "b", "label": 3})]
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:2: key 'label': expected 0 or 1, found 3")):
        read_local("pawsx", "train", "es", tmp_path)


def test_marc_is_never_bundled():
    dm = MARCDataModule(languages=["en"], source="bundled", backbone="tiny-random")
    with pytest.raises(DataError, match="no bundled data"):
        dm.load_records("train")


def test_non_crossling_checkpoints_are_refused(tmp_path):
    lightning_style = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, lightning_style)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(lightning_style)
    message = str(err.value)
    assert str(lightning_style) in message
    assert "expected keys 'crossling' and 'state_dict'" in message and "['epoch', 'state_dict']" in message

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"{garbage}: not a loadable checkpoint")):
        load_checkpoint(garbage)

    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {missing}")):
        load_checkpoint(missing)


class _Sneaky:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_never_loaded(tmp_path, capsys):
    path = tmp_path / "sneaky.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"crossling": {}, "state_dict": {}, "x": _Sneaky()}, f)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "epoch=0.ckpt"
    torch.save(
        {"crossling": {"hparams": {"backbone": "tiny-random"}}, "state_dict": {"weight": torch.ones(3, 3)}}, path
    )
    with pytest.raises(CheckpointError, match=r"weights do not fit this model.*backbone 'tiny-random'"):
        load_weights(torch.nn.Linear(2, 2), path)


# -- through the command ---------------------------------------------------------------------


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "crossling: error:" in result.stderr, result.stderr[-3000:]
    error_line = next(line for line in result.stderr.splitlines() if line.startswith("crossling: error:"))
    for fragment in fragments:
        assert fragment in error_line, error_line


def cli_args(run_dir, *extra: str) -> list[str]:
    return [
        "fit",
        "--model.backbone",
        "tiny-random",
        "--data.class_path",
        "datamodules.PAWSXDataModule",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        *extra,
    ]


def test_cli_malformed_json_line_exits_cleanly(tmp_path):
    data = tmp_path / "data"
    path = data / "pawsx" / "train" / "en.jsonl"
    write_lines(path, [good_pawsx_line(0), '{"id": 1, "sentence1": '])
    result = run_crossling(
        cli_args(
            tmp_path / "run",
            "--data.init_args.languages",
            "[en]",
            "--data.init_args.source",
            "local",
            "--data.init_args.data_dir",
            str(data),
        ),
        console_script=True,
    )
    assert_clean_failure(result, f"{path}:2", "malformed JSON line")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_unknown_language_exits_cleanly(tmp_path):
    result = run_crossling(cli_args(tmp_path / "run", "--data.init_args.languages", "[en, xx]"))
    assert_clean_failure(result, "data.languages", "'xx'", "expected some of")


def test_retired_tiny_backbone_and_pretrain_command_say_what_to_use_instead():
    from lightning_modules.backbones import build_classifier

    with pytest.raises(ValueError, match=r"backbone 'tiny' was retired; use tiny-random .* or e5-small"):
        build_classifier("tiny")
    result = run_crossling(["pretrain", "--config", "configs/pretrain/tiny.yaml"])
    assert result.returncode != 0
    assert "crossling pretrain was retired" in result.stderr and "Traceback" not in result.stderr
