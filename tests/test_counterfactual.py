"""The counterfactual check: leave-out fits train on exactly what they say, checkpoints record the
learning rates TracIn weighs by, the predicted change of loss from sketches equals the one from exact
per-example gradients, and the retrained change equals the test losses of the fits."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import lightning_modules  # noqa: F401  (registers the tiny-random tokenizer)
from analysis.counterfactual import (
    CONTROL,
    CounterfactualError,
    SeedCounterfactual,
    TestLosses,
    checkpoint_weights,
    column_permutation_p,
    counterfactual_matrix,
    describe_agreement,
    dev_did_not_learn,
    did_not_learn,
    interval_weights,
    load_test_losses,
    measure_agreement,
    noise_floor,
    score_removal_effects,
    sign_chance,
)
from analysis.counterfactual_report import load_effects, write_effects
from callbacks.checkpoints import (
    CheckpointError,
    EpochCheckpoint,
    list_all_checkpoints,
    list_checkpoints,
    load_checkpoint,
)
from datamodules import DataError
from tests.helpers import REPO, TINY_STUDY_OVERRIDES, small_pawsx_datamodule

LANGS = ["en", "de", "ko"]
LEFT_OUT = ["en", "de"]


# -- the data a leave-out fit trains on -----------------------------------------------------------


def epoch_indices(dm) -> list[int]:
    return sorted(int(i) for batch in dm.train_dataloader() for i in batch["indices"])


def test_leaving_out_a_language_trains_on_every_other_example_with_the_same_indices():
    full = small_pawsx_datamodule(languages=LANGS)
    without = small_pawsx_datamodule(languages=LANGS, leave_out="de")
    full_train = {e.index: e.lang for e in full.dataset("train").examples}
    # the split itself (what TracIn's indices refer to) is the same
    assert [(e.index, e.record.id) for e in without.dataset("train").examples] == \
        [(e.index, e.record.id) for e in full.dataset("train").examples]
    de = LANGS.index("de")
    expected = sorted(i for i, lang in full_train.items() if lang != de)
    assert epoch_indices(without) == expected
    assert sorted(without.left_out_indices().tolist()) == sorted(i for i, lang in full_train.items() if lang == de)
    assert epoch_indices(full) == sorted(full_train)


def test_random_control_leaves_out_one_language_worth_from_every_language_seeded_by_name():
    dm = small_pawsx_datamodule(languages=LANGS, leave_out=CONTROL)
    left = dm.left_out_indices()
    n = len(dm.dataset("train"))
    assert left.size == n // len(LANGS) and np.unique(left).size == left.size
    langs = {e.index: e.lang for e in dm.dataset("train").examples}
    assert len({langs[int(i)] for i in left}) > 1  # spread over languages, not one of them
    assert set(epoch_indices(dm)) == set(langs) - set(left.tolist())
    # the global RNGs do not move it; the data seed does
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.array_equal(small_pawsx_datamodule(languages=LANGS, leave_out=CONTROL).left_out_indices(), left)
    other = small_pawsx_datamodule(languages=LANGS, leave_out=CONTROL, seed=4).left_out_indices()
    assert not np.array_equal(other, left)


def test_leaving_out_a_language_the_run_does_not_train_on_is_one_clear_error():
    with pytest.raises(DataError, match=r"data.init_args.leave_out: 'fr' is not a training language .*'en', 'de', 'ko'"):
        small_pawsx_datamodule(languages=LANGS, leave_out="fr")


# -- learning rates in checkpoints ----------------------------------------------------------------


def fit_tiny(run: Path, *extra: str) -> None:
    from lightning_modules.cli import run_cli

    run_cli([
        "fit", "--config", str(REPO / "configs/demo/pawsx-full.yaml"), "--model.backbone=tiny-random",
        f"--trainer.default_root_dir={run}", "--data.init_args.languages=[en, de, ko]",
        "--data.init_args.train_per_language=20", "--data.init_args.dev_per_language=8",
        "--data.init_args.test_per_language=8", "--data.init_args.batch_size=6", "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
    ])


def schedule_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak over ``warmup`` steps, then linear decay to zero at ``total``
    (docs/methods.md, "The counterfactual prediction and its approximations")."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def test_checkpoints_record_each_epochs_mean_learning_rate_and_batch(tmp_path):
    fit_tiny(tmp_path / "run", "--model.learning_rate=0.002", "--model.warmup_ratio=0.25")
    steps_per_epoch = -(-60 // 6)  # 60 training examples in batches of 6
    total = 3 * steps_per_epoch
    warmup = int(0.25 * total)
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [e for e, _ in checkpoints] == [0, 1, 2]
    for epoch, path in checkpoints:
        meta = load_checkpoint(path)["crossling"]
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        expected = 0.002 * np.mean([schedule_factor(s, total, warmup) for s in steps])
        assert meta["optimizer_steps"] == steps_per_epoch
        assert meta["learning_rate"] == pytest.approx(expected, rel=1e-9)
        assert meta["examples_per_step"] == pytest.approx(6.0)
    # checkpoints of an older crossling, without the record: the schedule gives the same rates
    from lightning_modules.stages.counterfactual import reconstruct_rates

    metas = {e: {k: v for k, v in load_checkpoint(p)["crossling"].items() if k != "learning_rate"}
             for e, p in checkpoints}
    rates, per_step = reconstruct_rates(tmp_path / "run", metas, n_train=60)
    for epoch, path in checkpoints:
        meta = load_checkpoint(path)["crossling"]
        assert rates[epoch] == pytest.approx(meta["learning_rate"], rel=1e-12)
        assert per_step[epoch] == pytest.approx(meta["examples_per_step"])


def test_checkpoints_inside_an_epoch_hold_that_steps_weights_and_change_nothing_learned(tmp_path):
    """Positions 0.5 and 1.3 of 10-step epochs save after steps 5 and 13 the weights an independent callback
    saw there, with the sum of every rate used so far; the epoch checkpoints equal a fit without them."""
    args = ("--model.learning_rate=0.002", "--model.warmup_ratio=0.25")
    fit_tiny(tmp_path / "plain", *args)
    fit_tiny(tmp_path / "dense", *args, "--trainer.checkpoints_within_epoch=[0.5, 1.3]",
             "--trainer.callbacks+=tests.helpers.WeightsAtStep", "--trainer.callbacks.step=13",
             f"--trainer.callbacks.path={tmp_path / 'step13.pt'}")
    found = list_all_checkpoints(tmp_path / "dense")
    assert [name for name, _ in found] == ["epoch=0-step=5", "epoch=0", "epoch=1-step=13", "epoch=1", "epoch=2"]
    assert [e for e, _ in list_checkpoints(tmp_path / "dense")] == [0, 1, 2]  # the stages' view is unchanged
    for (_, a), (_, b) in zip(list_checkpoints(tmp_path / "plain"), list_checkpoints(tmp_path / "dense")):
        sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    reference = torch.load(tmp_path / "step13.pt")
    saved = load_checkpoint(dict(found)["epoch=1-step=13"])
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in reference["state_dict"].items())
    total, warmup = 30, int(0.25 * 30)
    assert reference["rates"] == pytest.approx([0.002 * schedule_factor(s, total, warmup) for s in range(13)])
    assert saved["crossling"]["rate_sum"] == pytest.approx(sum(reference["rates"]), rel=1e-12)
    assert saved["crossling"]["global_step"] == 13 and saved["crossling"]["epoch_steps"] == 10
    with pytest.raises(ValueError, match="checkpoints_within_epoch: expected positions inside an epoch"):
        EpochCheckpoint(within_epoch=[0.5, 2.0])


def test_interval_weights_split_an_epochs_weight_among_its_checkpoints():
    """For epoch checkpoints the same as ``checkpoint_weights``; each interval's weight is its steps' rates
    over an epoch's examples, so the weights of any subset add up to the same total."""
    rates = [0.1 * (s + 1) for s in range(20)]  # 2 epochs of 10 steps, batch 4: 40 examples an epoch
    def record(step):
        return {"rate_sum": sum(rates[:step]), "examples_per_step": 4.0, "epoch_steps": 10}
    ends = interval_weights([record(10), record(20)])
    means = {e: float(np.mean(rates[10 * e:10 * e + 10])) for e in (0, 1)}
    assert ends == pytest.approx(list(checkpoint_weights([0, 1], means, {0: 4.0, 1: 4.0}).values()))
    dense = interval_weights([record(3), record(10), record(15), record(20)])
    assert dense == pytest.approx([sum(rates[0:3]) / 40, sum(rates[3:10]) / 40, sum(rates[10:15]) / 40,
                                   sum(rates[15:20]) / 40])
    assert sum(dense) == pytest.approx(sum(ends)) == pytest.approx(sum(interval_weights([record(20)])))
    with pytest.raises(CounterfactualError, match="out of training order"):
        interval_weights([record(15), record(10)])
    with pytest.raises(CounterfactualError, match="record no rate_sum"):
        interval_weights([{"learning_rate": 0.1}])


def test_a_methods_removal_effect_is_its_scores_summed_over_the_removed_examples_the_pool_stands_for():
    """Reference: an explicit loop over the pool, each pool item standing for count(ℓ) / pool count(ℓ) of its
    language's training examples."""
    rng = np.random.default_rng(8)
    scores, pool_lang = rng.normal(size=(7, 12)), np.repeat([0, 1, 2], 4)
    counts = {"de": np.array([0, 20, 0]), "random": np.array([5, 6, 7])}
    found = score_removal_effects(scores, pool_lang, 3, counts)
    for removed, c in counts.items():
        expected = [sum(scores[t, z] * c[pool_lang[z]] / np.sum(pool_lang == pool_lang[z]) for z in range(12))
                    for t in range(7)]
        np.testing.assert_allclose(found[removed], expected, rtol=1e-12)
    lonely = score_removal_effects(scores[:, :8], pool_lang[:8], 3, {"ko": np.array([0, 0, 9])})  # no ko in the pool
    assert np.all(lonely["ko"] == 0)


def test_a_sketched_checkpoint_weighs_the_epochs_it_stands_for():
    rates, per_step = {0: 0.3, 1: 0.2, 2: 0.1}, {0: 10.0, 1: 10.0, 2: 5.0}
    assert checkpoint_weights([0, 1, 2], rates, per_step) == pytest.approx({0: 0.03, 1: 0.02, 2: 0.02})
    assert checkpoint_weights([2], rates, per_step) == pytest.approx({2: 0.03 + 0.02 + 0.02})
    assert checkpoint_weights([0, 2], rates, per_step) == pytest.approx({0: 0.03, 2: 0.04})
    with pytest.raises(CounterfactualError, match="no learning rate recorded for sketched epoch"):
        checkpoint_weights([3], rates, per_step)


# -- the pooled matrix and its agreement numbers on synthetic effects -------------------------------


def synthetic_seed(seed: int, own: float, n: int = 60) -> SeedCounterfactual:
    rng = np.random.default_rng(seed)
    lang = np.repeat(np.arange(len(LANGS)), n)
    retrained, predicted, accuracy = {}, {}, {}
    for removed in [*LANGS, CONTROL]:
        effect = np.where(lang == LANGS.index(removed), own, 0.0) if removed != CONTROL else np.zeros(lang.size)
        retrained[removed] = effect + 0.02 + rng.normal(0, 0.05, lang.size)  # the control: fewer examples hurt a bit
        predicted[removed] = 0.5 * effect + rng.normal(0, 0.01, lang.size)
        accuracy[removed] = -100.0 * (rng.random(lang.size) < 0.1)
    return SeedCounterfactual(seed, LANGS, lang, retrained, predicted, accuracy)


def test_an_own_language_effect_above_the_control_is_found_and_agreed_on():
    matrix = counterfactual_matrix([synthetic_seed(s, own=0.4) for s in range(3)], n_resamples=300)
    agreement = measure_agreement(matrix, shares=np.eye(3) * 50 + 10)
    assert agreement.own_largest_retrained == {lang: True for lang in LANGS}
    assert agreement.own_largest_predicted == {lang: True for lang in LANGS}
    assert agreement.own_largest_share == {lang: True for lang in LANGS}
    assert agreement.above_control == 3 and agreement.n_cells == 9
    assert agreement.cells["pearson_r"] > 0.9 and agreement.sign_agreement >= 3 / 9
    value, low, high = matrix.cell("excess", "de", "de")
    assert low > 0.3 and value == pytest.approx(0.4, abs=0.05)


def test_with_one_language_left_out_the_sentence_says_there_is_no_permutation_p():
    seeds = [without_removed(without_removed(synthetic_seed(0, own=0.4), "en"), "ko")]  # de and the control
    matrix = counterfactual_matrix(seeds, n_resamples=100)
    agreement = measure_agreement(matrix)
    assert np.isnan(agreement.cells["permutation_p"]) and agreement.n_cells == 3
    sentence = describe_agreement(agreement, matrix)
    assert "no permutation p: one fit left out" in sentence and "= nan" not in sentence
    both = describe_agreement(measure_agreement(counterfactual_matrix([synthetic_seed(0, own=0.4)], 100)), matrix)
    assert "permutation p = " in both and "exchanging the fits left out" in both


def test_the_figures_noise_lines_are_the_largest_refit_change_of_any_language():
    from analysis.counterfactual_plot import refit_band

    assert refit_band({"en": 0.02, "de": 0.061, "ru": float("nan"), "fr": 0.05}) == pytest.approx(0.061)
    assert refit_band({}) is None and refit_band(None) is None


def test_no_language_effect_is_not_called_above_the_control():
    matrix = counterfactual_matrix([synthetic_seed(s, own=0.0) for s in range(3)], n_resamples=300)
    agreement = measure_agreement(matrix)
    assert agreement.above_control <= 1  # nine cells at 95 %: at most a chance one
    assert agreement.own_largest_share is None


def test_a_model_that_only_predicts_the_majority_class_did_not_learn():
    rng = np.random.default_rng(7)
    lang = np.repeat(np.arange(len(LANGS)), 40)
    labels = (rng.random(lang.size) < np.where(lang == 1, 0.7, 0.35)).astype(np.int64)  # de's majority is 1
    majority_label = np.array([np.bincount(labels[lang == g]).argmax() for g in range(len(LANGS))])

    def model(correct: np.ndarray) -> TestLosses:
        return TestLosses(LANGS, np.arange(lang.size), lang, rng.random(lang.size), correct, "m")

    constant = labels == majority_label[lang]  # always answering each language's majority label
    assert did_not_learn(model(constant), labels)
    assert did_not_learn(model(~np.ones(lang.size, dtype=bool)), labels)  # worse than it, too
    better = constant.copy()
    better[np.flatnonzero((lang == 2) & ~constant)[0]] = True  # one more right answer, in one language
    assert not did_not_learn(model(better), labels)


def without_removed(seed: SeedCounterfactual, removed: str) -> SeedCounterfactual:
    keep = [r for r in seed.retrained if r != removed]
    return SeedCounterfactual(seed.seed, seed.languages, seed.lang, {r: seed.retrained[r] for r in keep},
                              {r: seed.predicted[r] for r in keep}, {r: seed.accuracy[r] for r in keep})


def test_a_leave_out_fit_that_did_not_learn_is_kept_out_of_the_agreement(tmp_path):
    seeds = []
    for s in range(2):
        seed = synthetic_seed(s, own=0.4)
        seed.retrained["de"] += 0.8  # a collapsed fit: every test language's loss rises alike
        seeds.append(SeedCounterfactual(*[getattr(seed, k) for k in ("seed", "languages", "lang", "retrained",
                                                                     "predicted", "accuracy")],
                                        not_learned=("de",) if s == 1 else ()))
    # the effects file keeps which fits failed
    assert load_effects(write_effects(tmp_path / "effects.npz", seeds[1]), 1).not_learned == ("de",)
    flagged = measure_agreement(counterfactual_matrix(seeds, n_resamples=200))
    reference = measure_agreement(counterfactual_matrix([without_removed(s, "de") for s in seeds], n_resamples=200))
    assert flagged.excluded == ("de",) and flagged.n_cells == 6
    for key in ("rank_by_test_language", "cells", "sign_agreement", "own_largest_retrained", "own_largest_predicted",
                "above_control", "below_control", "n_cells"):
        assert json.dumps(flagged.as_dict()[key]) == json.dumps(reference.as_dict()[key]), key  # NaN == NaN
    unflagged = measure_agreement(counterfactual_matrix([without_removed(s, "none") for s in seeds], n_resamples=200))
    assert unflagged.own_largest_retrained["en"] is False  # what the collapsed fit would have claimed
    sentence = describe_agreement(flagged, counterfactual_matrix(seeds, n_resamples=200))
    assert "without de" in sentence and "in at least one seed" in sentence


def test_a_control_that_did_not_learn_is_compared_with_nothing():
    seeds = [synthetic_seed(0, own=0.4)]
    seeds = [SeedCounterfactual(*[getattr(seeds[0], k) for k in ("seed", "languages", "lang", "retrained",
                                                                  "predicted", "accuracy")], not_learned=(CONTROL,))]
    matrix = counterfactual_matrix(seeds, n_resamples=200)
    agreement = measure_agreement(matrix)
    assert agreement.above_control == 0 and agreement.below_control == 0 and agreement.n_cells == 9
    assert "no cell is compared with it" in describe_agreement(agreement, matrix)


# -- the stage on a tiny study ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Full fine-tuning, its analysis (exact per-example gradients as the sketch), the leave-out fits
    and the counterfactual check, through the study runner."""
    from lightning_modules.study import load_study_config, plan_stages, run_study

    tmp = tmp_path_factory.mktemp("counterfactual")
    analyze = yaml.safe_load((REPO / "configs/demo/pawsx-analyze.yaml").read_text())
    analyze["sketch"] = {"kind": "exact"}
    analyze["influence"].update(m=6, bootstrap_resamples=50, train_per_language=10, epochs=[1])
    analyze["fidelity"] = {"n_test": 6, "n_train": 12}
    (tmp / "analyze.yaml").write_text(yaml.safe_dump(analyze))
    root = tmp / "study"
    config = {
        "root": str(root), "full": str(REPO / "configs/demo/pawsx-full.yaml"),
        "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"),
        "sft": str(REPO / "configs/demo/pawsx-sft.yaml"), "analyze": str(tmp / "analyze.yaml"),
        "random_seeds": [0], "natural_conditions": ["full"], "fidelity_seeds": [0], "seeds": [0],
        "counterfactual": LEFT_OUT, "counterfactual_refits": [5],
        # a checkpoint inside each epoch, for the prediction over them (benchmarks/adam_prediction.py)
        "overrides": [*TINY_STUDY_OVERRIDES, "--trainer.checkpoints_within_epoch=[0.5, 1.5]"],
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg, base = load_study_config(path)
    wanted = ["full", "natural-influence", "natural-analysis", "without-en", "without-de", "without-random", "refit-5",
              "counterfactual-analysis"]
    assert set(wanted) <= {s.name for s in plan_stages(cfg, base)}
    run_study(str(path), only=wanted)
    return root, path


def exact_gradient(module, example, layer_names) -> torch.Tensor:
    """One example's loss gradient over the sketched layers (weight row-major, then bias), by autograd."""
    module.zero_grad()
    ids = torch.tensor([example.input_ids])
    logits = module(ids, torch.ones_like(ids), None)
    F.cross_entropy(logits, torch.tensor([example.record.label])).backward()
    modules = dict(module.model.named_modules())
    return torch.cat([torch.cat([modules[n].weight.grad.reshape(-1), modules[n].bias.grad]) for n in layer_names])


def test_prediction_from_sketches_equals_exact_gradient_reference(tiny_study):
    from callbacks.checkpoints import load_weights
    from callbacks.sketching import SketchOptions, get_sketcher
    from datamodules import PAWSXDataModule
    from lightning_modules.classifier import SequenceClassifier

    root, _ = tiny_study
    full = root / "full"
    data = PAWSXDataModule(languages=LANGS, train_per_language=30, test_per_language=12, backbone="tiny-random")
    hparams = load_checkpoint(list_checkpoints(full)[-1][1])["crossling"]["hparams"]
    module = SequenceClassifier(**hparams).double()  # float64: the reference's rounding stays far below the test's
    names = get_sketcher(module.model, SketchOptions(kind="exact")).names
    effects = np.load(full / "counterfactual" / "effects.npz")
    pool = json.loads((full / "sketches" / "epoch=1" / "full" / "train.json").read_text())["indices"]
    train = {e.index: e for e in data.dataset("train").examples}
    test = data.dataset("test").examples
    # epoch 1 is the only sketched checkpoint: it stands for both epochs (rates from the checkpoints)
    metas = [load_checkpoint(p)["crossling"] for _, p in list_checkpoints(full)]
    weight = sum(m["learning_rate"] / m["examples_per_step"] for m in metas)
    load_weights(module, list_checkpoints(full)[1][1])
    module.double().eval()
    pool_grads = {i: exact_gradient(module, train[i], names) for i in pool}
    left_random = small_pawsx_datamodule(languages=LANGS, train_per_language=30, seed=0, leave_out=CONTROL)
    for removed in [*LEFT_OUT, CONTROL]:
        if removed == CONTROL:
            left = left_random.left_out_indices()
        else:
            left = [i for i, e in train.items() if e.lang == LANGS.index(removed)]
        # each language's removed count times its pool's mean gradient
        direction = torch.zeros_like(next(iter(pool_grads.values())))
        for code in range(len(LANGS)):
            count = sum(1 for i in left if train[int(i)].lang == code)
            rows = [pool_grads[i] for i in pool if train[i].lang == code]
            if count:
                direction += count * torch.stack(rows).mean(0)
        expected = [weight * float(exact_gradient(module, z, names) @ direction) for z in test]
        scale = max(abs(v) for v in expected)
        assert scale > 0
        np.testing.assert_allclose(effects[f"predicted_{removed}"], expected, rtol=1e-4, atol=1e-5 * scale)


def test_retrained_effect_is_the_leave_out_fits_loss_minus_the_full_runs(tiny_study):
    root, _ = tiny_study
    out = root / "full" / "counterfactual"
    full = load_test_losses(out / "losses" / "full.npz")
    effects = np.load(out / "effects.npz")
    assert [str(x) for x in effects["removed"]] == [*LEFT_OUT, CONTROL]
    for removed in [*LEFT_OUT, CONTROL]:
        run = load_test_losses(out / "losses" / f"without-{removed}.npz")
        np.testing.assert_allclose(effects[f"retrained_{removed}"], run.loss - full.loss)
        config = yaml.safe_load((root / f"without-{removed}" / "config.yaml").read_text())
        assert config["data"]["init_args"]["leave_out"] == removed
    # the fits differ: a model trained without a language is another model
    assert not np.allclose(effects["retrained_en"], 0)
    summary = json.loads((out / "counterfactual.json").read_text())
    # the tiny model may not beat the majority class: such fits leave the numbers (did_not_learn, tested above)
    assert set(summary["excluded"]) <= {*LEFT_OUT, CONTROL}
    assert summary["n_cells"] == len(LANGS) * len(set(LEFT_OUT) - set(summary["excluded"]))
    assert "Counterfactual check" in summary["sentence"]
    assert summary["prediction"]["epochs"] == [1]
    for figure in ("predicted_vs_retrained.png", "counterfactual_matrices.png"):
        assert (out / figure).stat().st_size > 10_000


def stage_command(root: Path, new_root: Path | None = None) -> list[str]:
    """The counterfactual stage's ``crossling`` arguments as the study ran them (optionally moved)."""
    command = json.loads((root / ".study" / "counterfactual-analysis.json").read_text())["command"]
    return [a.replace(str(root), str(new_root)) for a in command] if new_root else command


def test_a_stopped_check_resumes_from_its_test_losses_to_the_same_numbers(tiny_study):
    from lightning_modules.cli import run_cli

    root, _ = tiny_study
    out = root / "full" / "counterfactual"
    csv = (out / "counterfactual.csv").read_bytes()
    # stopped after evaluating three models, before the fourth and the tables
    for name in ("losses/without-random.npz", "counterfactual.csv", "counterfactual.json", "effects.npz"):
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "losses").iterdir()}
    run_cli(stage_command(root))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "losses").iterdir() if p.name in kept} == kept
    assert (out / "losses" / "without-random.npz").is_file()
    assert (out / "counterfactual.csv").read_bytes() == csv
    assert not list(out.rglob("*.tmp*"))


def test_a_leave_out_fit_from_another_config_or_missing_is_refused(tiny_study, tmp_path, capsys):
    from lightning_modules.cli import run_cli
    from lightning_modules.main import main

    root, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("sketches"))
    shutil.copytree(root / "full" / "sketches", copy / "full" / "sketches")
    config = copy / "without-de" / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["model"]["learning_rate"] = 0.5
    config.write_text(yaml.safe_dump(raw))
    command = stage_command(root, copy)
    with pytest.raises(CounterfactualError, match=r"without-de/config.yaml: model.learning_rate is 0.5 there"):
        run_cli(command)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(command)  # the command a user types: one line, exit status 2
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("crossling: error: ") and "model.learning_rate" in err[-1]
    shutil.rmtree(copy / "without-de" / "checkpoints")
    with pytest.raises(CheckpointError, match=r"without-de/checkpoints: no epoch=<E>.ckpt files .*leave_out de"):
        run_cli(command)


# -- the study's plan ---------------------------------------------------------------------------------


def plan_names(tmp_path: Path, **keys) -> list[str]:
    from lightning_modules.study import load_study_config, plan_stages

    config = {"root": str(tmp_path / "study"), "full": str(REPO / "configs/demo/pawsx-full.yaml"),
              "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"),
              "sft": str(REPO / "configs/demo/pawsx-sft.yaml"), "analyze": str(REPO / "configs/demo/pawsx-analyze.yaml"),
              "random_seeds": [0]} | keys
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg, base = load_study_config(path)
    return [s.name for s in plan_stages(cfg, base)]


def test_the_study_plans_one_fit_per_language_left_out_and_the_control_on_the_chosen_seeds(tmp_path):
    assert not any("without" in n for n in plan_names(tmp_path))
    names = plan_names(tmp_path, seeds=[0, 1], counterfactual=["en", "de"], counterfactual_seeds=[1])
    assert [n for n in names if "without" in n or "counterfactual" in n] == [
        "seed1-without-en", "seed1-without-de", "seed1-without-random", "seed1-counterfactual-analysis"]
    assert names[-1] == "report"
    names = plan_names(tmp_path, counterfactual=["en"], counterfactual_refits=[7, 8])
    assert [n for n in names if "refit" in n] == ["refit-7", "refit-8"]


@pytest.mark.parametrize("keys, message", [
    ({"counterfactual": []}, "key 'counterfactual': expected a non-empty list"),
    ({"counterfactual": ["en", "en"]}, "key 'counterfactual': expected a non-empty list of distinct"),
    ({"counterfactual": ["random"]}, "the random control is added by itself"),
    ({"counterfactual": ["en"], "counterfactual_seeds": [5]}, r"key 'counterfactual_seeds': .*study's seeds \[0\]"),
    ({"counterfactual": ["en"], "counterfactual_refits": [0]}, r"key 'counterfactual_refits': .*training seeds \[0\]"),
    ({"counterfactual": ["en"], "counterfactual_refits": [3, 3]}, "key 'counterfactual_refits': expected .* distinct"),
    ({"counterfactual_refits": [3]}, "key 'counterfactual_refits' needs the key 'counterfactual'"),
    ({"counterfactual": ["en"], "counterfactual_coupled": "yes"}, "key 'counterfactual_coupled': expected true or"),
    ({"counterfactual_coupled": True}, "key 'counterfactual_coupled' needs the key 'counterfactual'"),
])
def test_a_bad_counterfactual_list_is_one_line_naming_the_key(tmp_path, keys, message):
    with pytest.raises(ValueError, match=message):
        plan_names(tmp_path, **keys)


def test_coupled_leave_out_fits_keep_the_full_fits_order_and_refits_do_not(tmp_path):
    from lightning_modules.study import load_study_config, plan_stages

    config = {"root": str(tmp_path / "study"), "full": str(REPO / "configs/demo/pawsx-full.yaml"),
              "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"), "sft": None,
              "analyze": str(REPO / "configs/demo/pawsx-analyze.yaml"), "counterfactual": ["en"],
              "counterfactual_refits": [4], "counterfactual_coupled": True}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    stages = {s.name: s.command for s in plan_stages(*load_study_config(tmp_path / "study.yaml"))}
    for fit in ("without-en", "without-random"):
        assert "--data.init_args.coupled_order=true" in stages[fit]
    assert not any("coupled_order" in arg for arg in stages["refit-4"] + stages["full"])


def write_metrics(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_whether_a_fit_learned_is_judged_on_its_last_dev_validation(tmp_path):
    majority = {f"val/majority_{lang}": 0.6 for lang in LANGS}
    epoch0 = {"epoch": 0, **majority, **{f"val/acc_{lang}": 0.7 for lang in LANGS}}
    train_row = {"epoch": 1, "train/loss": 0.5}  # rows without validation are passed over
    stuck = {"epoch": 1, **majority, **{f"val/acc_{lang}": 0.6 for lang in LANGS}}
    assert dev_did_not_learn(write_metrics(tmp_path / "a.csv", [epoch0, stuck, train_row]), LANGS) is True
    one_better = stuck | {"val/acc_ko": 0.61}
    assert dev_did_not_learn(write_metrics(tmp_path / "b.csv", [epoch0, one_better]), LANGS) is False
    assert dev_did_not_learn(write_metrics(tmp_path / "c.csv", [stuck, epoch0]), LANGS) is False  # the last one
    assert dev_did_not_learn(write_metrics(tmp_path / "d.csv", [train_row]), LANGS) is None  # no validation: test
    assert dev_did_not_learn(tmp_path / "missing.csv", LANGS) is None


def test_when_every_leave_out_fit_failed_no_cell_is_compared():
    seeds = [synthetic_seed(0, own=0.4)]
    failed = SeedCounterfactual(*[getattr(seeds[0], k) for k in ("seed", "languages", "lang", "retrained",
                                                                 "predicted", "accuracy")], not_learned=tuple(LANGS))
    matrix = counterfactual_matrix([failed], n_resamples=100)
    assert matrix.grid("retrained", []).shape == (3, 0)  # not all removed sets, as an empty list once meant
    assert matrix.grid("retrained").shape == (3, 4)
    agreement = measure_agreement(matrix)
    assert agreement.n_cells == 0 and agreement.above_control == 0 and agreement.below_control == 0
    assert agreement.excluded == tuple(LANGS)
    assert not np.isfinite(agreement.sign_agreement)
    assert "no leave-out fit learned" in describe_agreement(agreement, matrix)


def with_refits(seed: SeedCounterfactual, noise: dict[str, float]) -> SeedCounterfactual:
    """``seed`` with two refits whose per-language loss changes are exactly +noise and -noise."""
    shift = np.array([noise[t] for t in LANGS])[seed.lang]
    return SeedCounterfactual(seed.seed, seed.languages, seed.lang, seed.retrained, seed.predicted, seed.accuracy,
                              refits={"refit-7": shift, "refit-8": -shift})


def test_cells_are_judged_against_the_refits_with_nothing_removed(tmp_path):
    seeds = [with_refits(synthetic_seed(s, own=0.4), {"en": 0.1, "de": 0.1, "ko": 0.9}) for s in range(2)]
    assert load_effects(write_effects(tmp_path / "e.npz", seeds[0]), 0).refits.keys() == {"refit-7", "refit-8"}
    floor = noise_floor(seeds)
    assert floor == {t: pytest.approx([v, -v]) for t, v in {"en": 0.1, "de": 0.1, "ko": 0.9}.items()}
    matrix = counterfactual_matrix(seeds, n_resamples=100)
    agreement = measure_agreement(matrix, floor=floor)
    # own-language cells move ~0.42, the others ~0.02: en's and de's own cells clear 0.1, ko's does not clear 0.9
    reference = sum(abs(matrix.cell("retrained", t, r)[0]) > {"en": 0.1, "de": 0.1, "ko": 0.9}[t]
                    for t in LANGS for r in LANGS)
    assert agreement.beyond_noise == reference == 2 and agreement.n_refits == 2
    assert agreement.noise_floor == pytest.approx({"en": 0.1, "de": 0.1, "ko": 0.9})
    assert agreement.control_beyond_noise == 0
    assert "2 of 9 cells (and 0 of 3 control cells) change test loss by more than any of 2 refits" in \
        describe_agreement(agreement, matrix)
    unjudged = measure_agreement(matrix)
    assert unjudged.beyond_noise is None and "own noise is not measured" in describe_agreement(unjudged, matrix)


def test_sign_agreement_has_its_chance_level_and_cells_a_test_that_respects_shared_fits():
    assert sign_chance(np.ones((3, 3)), np.ones((3, 3))) == 1.0
    mixed = np.array([[1.0, -1.0], [-1.0, 1.0]])
    assert sign_chance(mixed, np.ones((2, 2))) == 0.5
    rng = np.random.default_rng(3)
    retrained = rng.normal(size=(3, 4))
    # the same matrix: only the identity of the 4! column orders reaches r = 1
    assert column_permutation_p(retrained.copy(), retrained) == pytest.approx(1 / 24)
    # reference: every order by brute force
    predicted = retrained + rng.normal(scale=2.0, size=retrained.shape)
    observed = np.corrcoef(predicted.ravel(), retrained.ravel())[0, 1]
    null = [np.corrcoef(predicted[:, list(o)].ravel(), retrained.ravel())[0, 1] for o in itertools.permutations(range(4))]
    assert column_permutation_p(predicted, retrained) == pytest.approx(np.mean(np.array(null) >= observed - 1e-12))


def test_a_refit_is_the_full_run_with_another_seed_and_batch_order_and_its_change_is_the_noise(tiny_study):
    root, _ = tiny_study
    full, refit = yaml.safe_load((root / "full/config.yaml").read_text()), yaml.safe_load(
        (root / "refit-5/config.yaml").read_text())
    assert refit["seed_everything"] == 5 and refit["data"]["init_args"]["shuffle_seed"] == 5
    assert refit["model"]["init_seed"] == full["model"]["init_seed"]  # the same head, other dropout and order
    assert refit["data"]["init_args"]["leave_out"] is None
    # reference: the refit's Δ is its own evaluation minus the full run's, per test example
    effects = load_effects(root / "full/counterfactual/effects.npz", 0)
    losses = {name: load_test_losses(root / "full/counterfactual/losses" / f"{name}.npz") for name in ("full", "refit-5")}
    assert np.allclose(effects.refits["refit-5"], losses["refit-5"].loss - losses["full"].loss)
    assert np.abs(effects.refits["refit-5"]).max() > 0  # another batch order trains another model
    summary = json.loads((root / "full/counterfactual/counterfactual.json").read_text())
    floor = {t: abs(float(effects.refits["refit-5"][effects.lang == g].mean())) for g, t in enumerate(LANGS)}
    assert summary["n_refits"] == 1 and summary["noise_floor"] == pytest.approx(floor)
    # the tiny model stays at the majority class, so the check says it compares nothing rather than
    # judging cells against the floor (the sentence with refits is tested on synthetic effects above)
    assert "no leave-out fit learned" in summary["sentence"]


def test_a_refit_that_is_not_a_refit_is_refused(tiny_study, tmp_path):
    from lightning_modules.stages.counterfactual import check_refit_run

    root, _ = tiny_study
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(root / "full/config.yaml", same / "config.yaml")
    with pytest.raises(CounterfactualError, match=r"(seed_everything|shuffle_seed) is 0, as in the analysed run; a refit needs another seed"):
        check_refit_run(root / "full", same)
    other = tmp_path / "other"
    other.mkdir()
    config = yaml.safe_load((root / "refit-5/config.yaml").read_text())
    config["model"]["learning_rate"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CounterfactualError, match="model.learning_rate is 0.5 there .* seed and batch order only"):
        check_refit_run(root / "full", other)
    # a progress bar turned off (a fit logged to a file) changes nothing the fit learns: still a refit
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    config = yaml.safe_load((root / "refit-5/config.yaml").read_text())
    config["trainer"]["enable_progress_bar"] = not config["trainer"].get("enable_progress_bar", True)
    (quiet / "config.yaml").write_text(yaml.safe_dump(config))
    check_refit_run(root / "full", quiet)


def test_the_slope_says_how_far_the_prediction_falls_short_of_retrainings_scale():
    from analysis.counterfactual import calibration_slope

    rng = np.random.default_rng(3)
    retrained = rng.normal(size=(3, 4))
    predicted = 0.01 * retrained + rng.normal(0, 1e-4, size=(3, 4))
    assert calibration_slope(predicted, retrained) == pytest.approx(np.polyfit(retrained.ravel(), predicted.ravel(), 1)[0])
    assert calibration_slope(predicted, retrained) == pytest.approx(0.01, rel=0.05)
    agreement = measure_agreement(counterfactual_matrix([synthetic_seed(0, own=0.4)], n_resamples=100))
    # the synthetic prediction is half the retrained own-language effect: a slope near 0.5, not 1
    assert agreement.cells["slope"] == pytest.approx(0.5, abs=0.1)


def test_agreement_per_number_of_checkpoints_reads_each_prediction_alone():
    from analysis.counterfactual import checkpoint_agreement, language_grid

    seed = synthetic_seed(1, own=0.4)
    noise = {r: np.random.default_rng(9).normal(0, 1.0, seed.lang.size) for r in seed.predicted}
    by = {1: noise, 2: {r: 3.0 * v for r, v in seed.predicted.items()}}
    table = checkpoint_agreement(seed, by)
    left_out = list(LANGS)
    grid_r = language_grid(seed, seed.retrained, left_out)
    reference = np.corrcoef(language_grid(seed, by[2], left_out).ravel(), grid_r.ravel())[0, 1]
    assert table["2"]["pearson_r"] == pytest.approx(reference)
    assert table["2"]["slope"] == pytest.approx(3 * checkpoint_agreement(seed, {1: seed.predicted})["1"]["slope"])
    assert table["1"]["pearson_r"] < table["2"]["pearson_r"] and table["2"]["n"] == 9
    assert grid_r[1, 1] == pytest.approx(seed.retrained["de"][seed.lang == 1].mean())


def test_adam_prediction_benchmark_reads_the_preconditioner_each_checkpoint_recorded(tiny_study):
    """The benchmark runs on a study's full fit: every checkpoint holds Adam's factored preconditioner, and
    both predictions (plain and preconditioned) come out finite for every cell."""
    import re
    import subprocess
    import sys

    from tests.helpers import cli_env

    root, _ = tiny_study
    for _, path in list_checkpoints(root / "full"):
        assert load_checkpoint(path)["adam"]["layers"]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/adam_prediction.py"), str(root / "full"), "--k", "6", "--pairs", "1",
         "--train-per-language", "10"],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^(plain|adam) +([+-]\d\.\d+) +(-?\d+\.\d+) +(\d+\.\d+)$", result.stdout, re.M)
    assert [name for name, *_ in rows] == ["plain", "adam"], result.stdout
    assert all(np.isfinite(float(v)) for _, *values in rows for v in values)
    predicted_from = json.loads((root / "full/counterfactual/counterfactual.json").read_text())["prediction"]["epochs"]
    assert result.stdout.count("rank-one fidelity") == len(predicted_from)  # the checkpoints the stage used
    # every checkpoint, those inside epochs too: the last one alone stands for all of training, as the
    # epoch checkpoint the stage predicted from does, so its agreement is the same
    assert predicted_from == [1]
    dense = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/adam_prediction.py"), str(root / "full"), "--k", "6", "--pairs", "1",
         "--train-per-language", "10", "--all-checkpoints", "--variants", "plain"],
        capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert dense.returncode == 0, dense.stderr[-2000:]
    subsets = dict(re.findall(r"^(last \d|epoch ends) +plain +([+-]\d\.\d+ +-?\d+\.\d+ +\d+\.\d+)", dense.stdout, re.M))
    assert sorted(subsets) == ["epoch ends", "last 1", "last 2", "last 3", "last 4"], dense.stdout
    assert subsets["last 1"].split() == list(rows[0][1:]), (subsets, rows)


def test_each_methods_implied_removal_effect_is_set_against_retraining(tiny_study):
    """``method_agreement`` on the tiny study's sketches and effects (every fit counted as learned, since the tiny
    fits do not beat the majority class): Pearson r of each method's cell grid against retraining's equals one
    computed here by an explicit loop over test items and pool items, in dataset-index order."""
    from dataclasses import replace

    from analysis.counterfactual_report import load_effects
    from analysis.influence.methods import method_score_matrices
    from analysis.sketch_store import read_sketch
    from datamodules.base import leave_out_indices
    from lightning_modules.stages.counterfactual import method_agreement, sketched_epochs

    root, _ = tiny_study
    full = root / "full"
    seed = replace(load_effects(full / "counterfactual/effects.npz", 0), not_learned=())
    recorded = json.loads((full / "counterfactual/counterfactual.json").read_text())["by_method"]
    assert {"tracin", "trak"} <= set(recorded)
    dm = small_pawsx_datamodule(languages=LANGS, train_per_language=30, dev_per_language=8, test_per_language=12,
                                seed=0)
    epochs = sketched_epochs(full, "full")
    scores = method_score_matrices(full, "full", epochs)
    test_index = np.array(sorted(e.index for e in dm.dataset("test").examples))
    found = method_agreement(full, dm, "full", seed, test_index, scores)
    train, test = (read_sketch(full, epochs[-1], "full", split) for split in ("train", "test"))
    examples = dm.dataset("train").examples
    left_out = [r for r in seed.retrained if r != CONTROL]
    for method, s in scores.items():
        predicted, retrained = [], []
        for r in left_out:
            removed = set(leave_out_indices(examples, LANGS, r, dm.seed).tolist())
            removed_langs = [e.lang for p, e in enumerate(examples) if p in removed]
            for t_lang in range(len(LANGS)):
                rows = [i for i, x in enumerate(test.indices) if LANGS.index(test.langs[i]) == t_lang]
                total = 0.0
                for i in rows:
                    for z, lang in enumerate(train.langs):
                        code = LANGS.index(lang)
                        total += s[i, z] * removed_langs.count(code) / sum(1 for x in train.langs if x == lang)
                predicted.append(total / len(rows))
                retrained.append(seed.retrained[r][seed.lang == t_lang].mean())
        assert found[method]["pearson_r"] == pytest.approx(np.corrcoef(predicted, retrained)[0, 1], rel=1e-9)


@pytest.mark.parametrize("natural, expected", [(["full"], ["trak", "ekfac"]), (["own"], ["trak"])])
def test_the_check_waits_for_the_methods_the_study_ranks_it_with(tmp_path, natural, expected):
    """The counterfactual check scores every method whose inputs the full run holds, so it runs after their
    stages; EK-FAC has none where the natural analysis lacks the full condition."""
    from lightning_modules.study import load_study_config, plan_stages

    config = {"root": str(tmp_path / "study"), "full": str(REPO / "configs/demo/pawsx-full.yaml"),
              "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"), "sft": None,
              "analyze": str(REPO / "configs/demo/pawsx-analyze.yaml"), "counterfactual": ["en"],
              "natural_conditions": natural, "attribution_methods": ["trak", "ekfac"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    stages = {s.name: s for s in plan_stages(*load_study_config(tmp_path / "study.yaml"))}
    waits = [d for d in stages["counterfactual-analysis"].depends if d.endswith("-analysis")]
    assert waits == ["natural-analysis", *(f"natural-{m}-analysis" for m in expected)]
    assert all(d in stages for d in stages["counterfactual-analysis"].depends)
    assert ("natural-ekfac-analysis" in stages) == ("full" in natural)


def test_a_method_stage_compared_with_the_full_run_waits_for_its_ranking(tmp_path):
    """SFT's ranking by a method reads the full run's ranking by that method (--compare_to): it depends on it."""
    from lightning_modules.study import load_study_config, plan_stages

    config = {"root": str(tmp_path / "study"), "full": str(REPO / "configs/demo/pawsx-full.yaml"),
              "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"),
              "sft": str(REPO / "configs/demo/pawsx-sft.yaml"), "random_seeds": [0],
              "analyze": str(REPO / "configs/demo/pawsx-analyze.yaml"), "attribution_methods": ["trak", "repsim"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    stages = {s.name: s for s in plan_stages(*load_study_config(tmp_path / "study.yaml"))}
    for method in ("trak", "repsim"):
        assert stages[f"natural-{method}-analysis"].depends == ["natural-influence"]
        for analysis in ("sft", "sft-random0"):
            assert stages[f"{analysis}-{method}-analysis"].depends == [f"{analysis}-influence",
                                                                      f"natural-{method}-analysis"]
    order = list(stages)
    assert all(order.index(d) < order.index(n) for n, s in stages.items() for d in s.depends)
