"""Sparse fine-tuning: what a language's batch may and may not change."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules import PAWSXDataModule
from lightning_modules.classifier import SequenceClassifier
from lightning_modules.gates import attention_output_projections, disabled_parameter_masks

LANGS = ["en", "de", "ko"]


def write_masks(directory, shape=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    for lang in LANGS:
        mask = np.ones(shape, dtype=int)
        off = rng.choice(mask.size, size=5, replace=False)
        mask.reshape(-1)[off] = 0
        masks[lang] = mask
        (directory / f"{lang}.json").write_text(json.dumps({"mask": mask.tolist()}))
    return masks


class StepRecorder(pl.Callback):
    """Parameters before and after every optimizer step, with the step's language."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self._lang = int(batch["langs"][0])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.steps.append((self._lang, self._before, after))


class GradientRecorder(pl.Callback):
    """The gradients the optimizer used, read by a post-hook of optimizer.step (Lightning steps with a
    closure, so a pre-hook would fire before the backward pass)."""

    def __init__(self):
        self.grads = []

    def on_train_start(self, trainer, module):
        def hook(optimizer, args, kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

        trainer.optimizers[0].register_step_post_hook(hook)


def train(tmp_path, mode, callbacks, steps=6, weight_decay=0.1, backbone="tiny-random"):
    torch.manual_seed(0)
    masks = write_masks(tmp_path)
    assert not (tmp_path / "run").exists()
    dm = PAWSXDataModule(languages=LANGS, train_per_language=16, dev_per_language=8, test_per_language=8,
                         batch_size=4, batching="language", backbone=backbone, seed=3)
    module = SequenceClassifier(backbone=backbone, languages=LANGS, learning_rate=1e-2, weight_decay=weight_decay,
                                schedule="constant", subnetworks=str(tmp_path), mask_mode=mode, dropout=0.0)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path / "run",
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    return module, masks


def named_disabled(module, mask):
    by_param = disabled_parameter_masks(module.model, torch.as_tensor(mask))
    return {n: by_param[p] for n, p in module.named_parameters() if p in by_param}


@pytest.mark.parametrize("backbone", ["tiny-random", "tiny-bert-random"])
def test_strict_mode_keeps_disabled_head_slices_bit_identical(tmp_path, backbone):
    recorder = StepRecorder()
    module, masks = train(tmp_path, "strict", [recorder], backbone=backbone)
    assert len({lang for lang, _, _ in recorder.steps}) > 1, "the run should alternate languages"
    for lang_index, before, after in recorder.steps:
        disabled = named_disabled(module, masks[LANGS[lang_index]])
        moved_enabled = False
        for name, off in disabled.items():
            assert torch.equal(before[name][off], after[name][off]), f"{name}: a disabled head moved"
            moved_enabled |= not torch.equal(before[name][~off], after[name][~off])
        assert moved_enabled, "enabled heads should have been updated"
        # shared parameters (embeddings, FFN, classifier) are updated by every batch
        head = "model.classifier.dense.weight" if backbone == "tiny-random" else "model.bert.pooler.dense.weight"
        assert not torch.equal(before[head], after[head])


def test_gradient_mode_zeroes_gradients_but_adamw_still_moves_disabled_heads(tmp_path):
    recorder, grads = StepRecorder(), GradientRecorder()
    module, masks = train(tmp_path, "gradient", [recorder, grads])
    moved = False
    for (lang_index, before, after), step_grads in zip(recorder.steps, grads.grads):
        disabled = named_disabled(module, masks[LANGS[lang_index]])
        for name, off in disabled.items():
            assert torch.count_nonzero(step_grads[name][off]) == 0, f"{name}: gradient on a disabled head"
            moved |= not torch.equal(before[name][off], after[name][off])
    # the paper's footnote masking: momentum and decoupled weight decay still move the slices
    assert moved, "expected AdamW to move some disabled-head parameters in gradient mode"


def test_training_forward_gates_equal_zeroing_heads_by_hand(tmp_path):
    masks = write_masks(tmp_path)
    module = SequenceClassifier(backbone="tiny-random", languages=LANGS, subnetworks=str(tmp_path), dropout=0.0)
    module.eval()
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 8000, (3, 11), generator=generator)
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    labels = torch.tensor([0, 1, 1])
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "langs": torch.full((3,), 1)}
    module._trainer = None
    with torch.no_grad():
        logits = module(ids, att, module.language_masks[module.batch_language(batch)])
        by_hand = SequenceClassifier(backbone="tiny-random", languages=LANGS, dropout=0.0).eval()
        by_hand.load_state_dict(module.state_dict())
        mask = masks["de"]
        head_dim = 64 // 4
        for layer, proj in enumerate(attention_output_projections(by_hand.model)):
            for head in np.flatnonzero(mask[layer] == 0):
                proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
        expected = by_hand(ids, att)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_sparse_training_refuses_mixed_language_batches(tmp_path):
    write_masks(tmp_path)
    module = SequenceClassifier(backbone="tiny-random", languages=LANGS, subnetworks=str(tmp_path))
    batch = {"langs": torch.tensor([0, 1])}
    with pytest.raises(RuntimeError, match="batching: language"):
        module.batch_language(batch)


def test_predictions_npz_matches_accuracy_csv_and_the_test_set(tmp_path):
    """The per-example file the callback writes is the table's source: its per-language means are
    accuracy.csv's values, its rows are the test split's examples (by dataset index), every column present."""
    import csv

    from analysis.accuracy_stats import load_predictions

    full = tmp_path / "full"
    (full / "subnetworks").mkdir(parents=True)
    write_masks(full / "subnetworks")
    reference = SequenceClassifier(backbone="tiny-random", languages=LANGS, init_seed=1, dropout=0.0)
    (full / "checkpoints").mkdir()
    torch.save({"crossling": {"format": 1, "epoch": 0, "hparams": dict(reference.hparams)},
                "state_dict": reference.state_dict()}, full / "checkpoints" / "epoch=0.ckpt")
    torch.manual_seed(0)
    dm = PAWSXDataModule(languages=LANGS, train_per_language=16, dev_per_language=8, test_per_language=8,
                         batch_size=4, batching="language", backbone="tiny-random", seed=3, eval_batch_size=5)
    module = SequenceClassifier(backbone="tiny-random", languages=LANGS, learning_rate=1e-2, schedule="constant",
                                subnetworks=str(full / "subnetworks"), dropout=0.0)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path / "sft", enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)

    out = tmp_path / "sft" / "accuracy"
    preds = load_predictions(out / "predictions.npz")
    assert not list(out.glob("*.tmp*"))
    columns = ["full_model", "subnetwork_after_full_ft", "subnetwork_after_sft"]
    assert list(preds.correct) == columns and preds.languages == LANGS
    examples = dm.dataset("test").examples
    np.testing.assert_array_equal(preds.test_index, [e.index for e in examples])
    np.testing.assert_array_equal(preds.lang, [e.lang for e in examples])
    np.testing.assert_array_equal(preds.label, [e.record.label for e in examples])
    with open(out / "accuracy.csv", newline="") as f:
        table = {row["language"]: row for row in csv.DictReader(f)}
    assert list(table) == [*LANGS, "mean"]
    for column in columns:
        for g, lang in enumerate(LANGS):
            assert float(table[lang][column]) == pytest.approx(preds.correct[column][preds.lang == g].mean(), abs=5e-5)
    # the three columns are three different models' results, not one copied
    assert len({preds.correct[c].tobytes() for c in columns}) > 1
