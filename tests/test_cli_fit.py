"""``crossling fit`` end to end on tiny-random: the run directory's contract (per-epoch
checkpoints that load weights-only, a replayable config.yaml, per-language validation
accuracy in logs/metrics.csv that matches a direct evaluation), and ``--print_config``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, build_data, dev_accuracy, logged_val_rows, run_config, run_crossling, tiny_fit_args

from callbacks.checkpoints import list_checkpoints, load_checkpoint, load_weights
from lightning_modules.classifier import SequenceClassifier


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli-fit") / "run"
    result = run_crossling(tiny_fit_args(run_dir), console_script=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_writes_one_weights_only_checkpoint_per_epoch(fitted_run):
    checkpoints = list_checkpoints(fitted_run)
    assert [epoch for epoch, _ in checkpoints] == [0, 1]
    # the resume state (weights and optimizer) goes when the fit has ended: nothing later reads it
    assert not (fitted_run / "checkpoints" / "last.ckpt").exists()
    assert not list((fitted_run / "checkpoints").glob("*.tmp*")), "a temporary file was left behind"
    config = run_config(fitted_run)
    data = build_data(config)
    states = []
    for epoch, path in checkpoints:
        assert path.name == f"epoch={epoch}.ckpt"
        payload = load_checkpoint(path)  # torch.load(weights_only=True) inside
        meta = payload["crossling"]
        assert meta["epoch"] == epoch and meta["global_step"] == 2 * (epoch + 1)
        assert meta["hparams"]["backbone"] == "tiny-random"
        assert meta["hparams"]["languages"] == data.languages
        fresh = SequenceClassifier(**meta["hparams"])
        assert load_weights(fresh, path) == meta
        states.append(payload["state_dict"])
    initial = SequenceClassifier(backbone="tiny-random", languages=data.languages).state_dict()
    key = "model.classifier.dense.weight"
    assert not torch.equal(states[0][key], initial[key]), "epoch 0 did not train"
    assert not torch.equal(states[1][key], states[0][key]), "epoch 1 did not train"


def test_keep_last_checkpoint_keeps_the_resume_state_of_a_finished_fit(tmp_path, fitted_run):
    run_dir = tmp_path / "run"
    result = run_crossling(tiny_fit_args(run_dir, "--trainer.keep_last_checkpoint", "true"))
    assert result.returncode == 0, result.stderr[-4000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["optimizer_states"], sorted(last)
    # the option changes what is kept, not what is trained
    ours = load_checkpoint(run_dir / "checkpoints" / "epoch=1.ckpt")["state_dict"]
    theirs = load_checkpoint(fitted_run / "checkpoints" / "epoch=1.ckpt")["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_fit_killed_between_epochs_resumes_to_the_weights_of_one_that_ran_through(tmp_path, fitted_run):
    run_dir = tmp_path / "run"
    args = tiny_fit_args(run_dir, "--model.dropout", "0.3")  # dropout draws from the RNG: resuming must restore it
    killed = run_crossling([*args, "--trainer.callbacks+=tests.helpers.DieAtEpoch", "--trainer.callbacks.epoch=1"])
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "checkpoints" / "epoch=1.ckpt").exists()
    resumed = run_crossling([*args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_config(run_dir)["ckpt_path"] is None  # config.yaml replays the run, not its resumption
    through = tmp_path / "through"
    result = run_crossling(tiny_fit_args(through, "--model.dropout", "0.3"))
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        ours = load_checkpoint(run_dir / "checkpoints" / f"epoch={epoch}.ckpt")["state_dict"]
        theirs = load_checkpoint(through / "checkpoints" / f"epoch={epoch}.ckpt")["state_dict"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"epoch {epoch} differs after resuming"


def test_metrics_csv_has_every_language_and_matches_direct_evaluation(fitted_run):
    config = run_config(fitted_run)
    data = build_data(config)
    rows = logged_val_rows(fitted_run)
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    for row in rows:
        accs = [float(row[f"val/acc_{lang}"]) for lang in data.languages]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert float(row["val/acc"]) == pytest.approx(sum(accs) / len(accs), abs=1e-6)

    # reference: the epoch-1 weights (saved after that epoch's validation) on the whole dev split
    for lang, acc in dev_accuracy(fitted_run, epoch=1).items():
        assert float(rows[1][f"val/acc_{lang}"]) == pytest.approx(acc, abs=1e-6)


def test_config_yaml_replays_the_run(fitted_run, tmp_path, monkeypatch):
    """Re-running the saved config (elsewhere) gives the same weights."""
    from lightning_modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["crossling"])  # in-process: pytest's own arguments are not ours

    replay_dir = tmp_path / "replay"
    run_cli(
        ["fit", "--config", str(fitted_run / "config.yaml"), "--trainer.default_root_dir", str(replay_dir)]
    )
    assert run_config(replay_dir)["trainer"]["max_epochs"] == run_config(fitted_run)["trainer"]["max_epochs"]
    original = load_checkpoint(fitted_run / "checkpoints" / "epoch=1.ckpt")["state_dict"]
    replayed = load_checkpoint(replay_dir / "checkpoints" / "epoch=1.ckpt")["state_dict"]
    assert original.keys() == replayed.keys()
    for key in original:
        torch.testing.assert_close(replayed[key], original[key], rtol=1e-5, atol=1e-6, msg=key)


def test_print_config_shows_the_learning_rate(capsys, monkeypatch):
    from lightning_modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["crossling"])

    config_path = REPO / "configs" / "xnli" / "full.yaml"
    if not config_path.is_file():
        config_path = REPO / "configs" / "demo" / "pawsx-full.yaml"
    written = yaml.safe_load(config_path.read_text())
    expected = written.get("model", {}).get("learning_rate")
    if expected is None:
        expected = inspect.signature(SequenceClassifier).parameters["learning_rate"].default
    with pytest.raises(SystemExit) as done:
        run_cli(["fit", "--config", str(config_path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert float(printed["model"]["learning_rate"]) == float(expected)
    assert printed["data"]["class_path"] == written["data"]["class_path"]
