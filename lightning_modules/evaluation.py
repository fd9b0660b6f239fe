"""Accuracy per language under head masks, and the accuracy table of sparse fine-tuning
(the paper's Table 2): full model vs its subnetworks after full fine-tuning vs after SFT.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks.checkpoints import list_checkpoints, load_weights


@torch.no_grad()
def accuracy_by_language(module, dataloader, languages: list[str], language_masks: torch.Tensor | None) -> dict[str, float]:
    """Accuracy of ``module`` per language; ``language_masks[i]`` (L×H) is applied to language i's examples."""
    was_training = module.training
    module.eval()
    correct = torch.zeros(len(languages))
    total = torch.zeros(len(languages))
    device = next(module.parameters()).device
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        masks = language_masks.to(device)[batch["langs"]] if language_masks is not None else None
        preds = module(batch["input_ids"], batch["attention_mask"], masks).argmax(-1)
        hits = (preds == batch["labels"]).float().cpu()
        langs = batch["langs"].cpu()
        correct.index_add_(0, langs, hits)
        total.index_add_(0, langs, torch.ones_like(hits))
    module.train(was_training)
    return {lang: float(correct[i] / total[i]) if total[i] else float("nan") for i, lang in enumerate(languages)}


def write_accuracy_table(path: Path, rows: dict[str, dict[str, float]]) -> None:
    """CSV (language + one column per model) and a grouped bar chart beside it; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(next(iter(rows.values())))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["language", *columns])
        for lang, values in rows.items():
            writer.writerow([lang, *(f"{values[c]:.4f}" for c in columns)])
        means = {c: sum(v[c] for v in rows.values()) / len(rows) for c in columns}
        writer.writerow(["mean", *(f"{means[c]:.4f}" for c in columns)])
    os.replace(tmp, path)
    from analysis.accuracy_plot import plot_accuracy_table

    plot_accuracy_table(rows, path.with_suffix(".png"))


class AccuracyTable(pl.Callback):
    """At the end of a sparse fine-tuning run: accuracy per language of the full model, of the
    subnetworks applied to the fully fine-tuned model, and of the subnetworks after SFT.

    The fully fine-tuned model is the last checkpoint of the run that owns the subnetworks
    directory (``<full run>/subnetworks``). Written to ``<run dir>/accuracy/accuracy.csv``.
    """

    def __init__(self, split: str = "test"):
        self.split = split

    def on_fit_end(self, trainer: pl.Trainer, module) -> None:
        if not trainer.is_global_zero or not module.sparse or trainer.datamodule is None:
            return
        loader = trainer.datamodule.eval_dataloader(self.split, shard=False)
        languages, masks = module.languages, module.language_masks
        rows = {lang: {} for lang in languages}
        full_run = Path(module.hparams.subnetworks).resolve().parent
        checkpoints = list_checkpoints(full_run)
        if checkpoints:
            args = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
            reference = type(module)(**{**args, "subnetworks": None, "random_mask_seed": None}).to(module.device)
            load_weights(reference, checkpoints[-1][1])
            for column, applied in (("full_model", None), ("subnetwork_after_full_ft", masks)):
                for lang, acc in accuracy_by_language(reference, loader, languages, applied).items():
                    rows[lang][column] = acc
        for lang, acc in accuracy_by_language(module, loader, languages, masks).items():
            rows[lang]["subnetwork_after_sft"] = acc
        write_accuracy_table(Path(trainer.default_root_dir) / "accuracy" / "accuracy.csv", rows)
