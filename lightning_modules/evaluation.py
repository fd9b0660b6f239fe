"""Accuracy per language under head masks, and the accuracy table of sparse fine-tuning
(the paper's Table 2): full model vs its subnetworks after full fine-tuning vs after SFT.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from analysis.atomic import atomic_write
from callbacks.checkpoints import list_checkpoints, load_weights


@dataclass(frozen=True)
class LanguageAccuracy:
    """Per-example results of one model on one split, kept so that accuracies get confidence
    intervals and paired comparisons (same examples, several models) instead of bare means.
    Arrays are in dataset-index order, so the results of several models line up row by row."""

    languages: list[str]
    test_index: np.ndarray  # the example's index in its split (``Example.index``)
    lang: np.ndarray
    label: np.ndarray
    correct: np.ndarray  # bool

    def means(self) -> dict[str, float]:
        """Accuracy per language (NaN for a language without examples), in float32 as accuracy.csv
        has always been computed, so its values do not move."""
        correct = np.bincount(self.lang, weights=self.correct, minlength=len(self.languages)).astype(np.float32)
        total = np.bincount(self.lang, minlength=len(self.languages)).astype(np.float32)
        return {lang: float(correct[i] / total[i]) if total[i] else float("nan") for i, lang in enumerate(self.languages)}


@torch.no_grad()
def accuracy_by_language(module, dataloader, languages: list[str], language_masks: torch.Tensor | None) -> LanguageAccuracy:
    """Per-example correctness of ``module``; ``language_masks[i]`` (L×H) is applied to language i's
    examples. Batches carry their examples' dataset indices (``indices``), so the result is keyed by them."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    parts: dict[str, list[np.ndarray]] = {"indices": [], "langs": [], "labels": [], "correct": []}
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        masks = language_masks.to(device)[batch["langs"]] if language_masks is not None else None
        preds = module(batch["input_ids"], batch["attention_mask"], masks).argmax(-1)
        parts["correct"].append((preds == batch["labels"]).cpu().numpy())
        for key in ("indices", "langs", "labels"):
            parts[key].append(batch[key].cpu().numpy())
    module.train(was_training)
    arrays = {k: np.concatenate(v) if v else np.zeros(0, dtype=bool if k == "correct" else np.int64) for k, v in parts.items()}
    order = np.argsort(arrays["indices"], kind="stable")
    return LanguageAccuracy(list(languages), arrays["indices"][order], arrays["langs"][order],
                            arrays["labels"][order], arrays["correct"][order].astype(bool))


def write_accuracy_table(path: Path, rows: dict[str, dict[str, float]]) -> None:
    """CSV (language + one column per model) and a grouped bar chart beside it; written atomically."""
    columns = list(next(iter(rows.values())))
    with atomic_write(path) as f:
        writer = csv.writer(f)
        writer.writerow(["language", *columns])
        for lang, values in rows.items():
            writer.writerow([lang, *(f"{values[c]:.4f}" for c in columns)])
        means = {c: sum(v[c] for v in rows.values()) / len(rows) for c in columns}
        writer.writerow(["mean", *(f"{means[c]:.4f}" for c in columns)])
    from analysis.accuracy_plot import plot_accuracy_table

    plot_accuracy_table(rows, path.with_suffix(".png"))


def write_predictions(path: Path, results: dict[str, LanguageAccuracy]) -> None:
    """``predictions.npz``: every example's correctness per model column, so Table 2 gets bootstrap
    intervals and paired differences (analysis/accuracy_stats.py). Plain arrays only (loads with
    ``allow_pickle=False``); written to a temporary name and renamed, so a reader never sees half a file."""
    first = next(iter(results.values()))
    for column, r in results.items():
        if not (np.array_equal(r.test_index, first.test_index) and np.array_equal(r.label, first.label)):
            raise RuntimeError(f"{path}: column {column!r} was evaluated on other examples than the others")
    arrays = {
        "test_index": first.test_index.astype(np.int64),
        "lang": first.lang.astype(np.int64),
        "languages": np.array(first.languages, dtype=np.str_),
        "label": first.label.astype(np.int64),
        **{f"correct_{column}": r.correct.astype(bool) for column, r in results.items()},
    }
    with atomic_write(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


class AccuracyTable(pl.Callback):
    """At the end of a sparse fine-tuning run: accuracy per language of the full model, of the
    subnetworks applied to the fully fine-tuned model, and of the subnetworks after SFT.

    The fully fine-tuned model is the last checkpoint of the run that owns the subnetworks
    directory (``<full run>/subnetworks``). Written to ``<run dir>/accuracy/accuracy.csv`` (per-language
    means) and ``<run dir>/accuracy/predictions.npz`` (per-example correctness, keyed by dataset index).
    """

    def __init__(self, split: str = "test"):
        self.split = split

    def on_fit_end(self, trainer: pl.Trainer, module) -> None:
        if not trainer.is_global_zero or not module.sparse or trainer.datamodule is None:
            return
        loader = trainer.datamodule.eval_dataloader(self.split, shard=False)
        languages, masks = module.languages, module.language_masks
        results: dict[str, LanguageAccuracy] = {}
        full_run = Path(module.hparams.subnetworks).resolve().parent
        checkpoints = list_checkpoints(full_run)
        if checkpoints:
            args = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
            reference = type(module)(**{**args, "subnetworks": None, "random_mask_seed": None}).to(module.device)
            load_weights(reference, checkpoints[-1][1])
            for column, applied in (("full_model", None), ("subnetwork_after_full_ft", masks)):
                results[column] = accuracy_by_language(reference, loader, languages, applied)
        results["subnetwork_after_sft"] = accuracy_by_language(module, loader, languages, masks)
        rows = {lang: {} for lang in languages}
        for column, result in results.items():
            for lang, acc in result.means().items():
                rows[lang][column] = acc
        out = Path(trainer.default_root_dir) / "accuracy"
        write_accuracy_table(out / "accuracy.csv", rows)
        write_predictions(out / "predictions.npz", results)
