"""The predict-time module of the sketch stage: ``Trainer.predict`` over one pass (a ``SketchJob``),
each batch sketched under each example's mask, so ``--trainer.strategy ddp`` shards the work.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from .sketch_writer import SketchJob, SketchWriter, rank_share, to_numpy_rows
from .sketching import SketchOptions, sketch_batch


class SketchModule(pl.LightningModule):
    """Wraps the classifier for ``Trainer.predict``: its own dataloader (the datamodule's rank
    share of the split, built once the strategy knows the ranks) and a ``predict_step`` that
    sketches each batch under each example's mask. Batches whose rows are all done already
    (a resumed run) are skipped without computing anything.
    """

    def __init__(
        self,
        classifier: pl.LightningModule,
        datamodule,
        job: SketchJob,
        options: SketchOptions,
        writer: SketchWriter,
    ):
        super().__init__()
        self.classifier = classifier
        self._datamodule, self.job, self.options, self.writer = datamodule, job, options, writer
        self.shares: dict[str, np.ndarray] | None = None
        shape = classifier.gates.shape
        table = np.ones((len(job.languages), *shape), dtype=np.float32)
        for lang, name in job.lang_masks.items():
            if job.head_masks[name] is not None:
                table[lang] = job.head_masks[name]
        self._gated = any(job.head_masks[name] is not None for name in job.lang_masks.values())
        # the examples this pass writes: a training pool leaves out some of every language's
        self._wanted = np.unique(np.concatenate([t.indices for t in job.targets.values()]))
        self.register_buffer("mask_table", torch.as_tensor(table), persistent=False)

    def predict_dataloader(self):
        self._datamodule.trainer = self.trainer  # rank-sliced batches
        loader = self._datamodule.eval_dataloader(self.job.split)
        self.shares = rank_share(loader, self._datamodule.dataset(self.job.split), self.job)
        return loader

    def predict_step(self, batch, batch_idx):
        indices = batch["indices"].cpu().numpy()
        langs = batch["langs"].cpu().numpy()
        keep = np.isin(indices, self._wanted) & np.array([int(lang) in self.job.lang_masks for lang in langs], dtype=bool)
        if not keep.any() or self.writer.is_done(indices[keep], langs[keep]):
            return None
        rows = torch.as_tensor(np.flatnonzero(keep), device=batch["input_ids"].device)
        device_type = batch["input_ids"].device.type
        # Lightning may run predict in inference mode and under autocast: sketches need autograd and set their own precision
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            sub = {
                key: batch[key].index_select(0, rows).clone()
                for key in ("input_ids", "attention_mask", "labels")
            }
            width = int(sub["attention_mask"].sum(1).max())
            sub["input_ids"], sub["attention_mask"] = (
                sub["input_ids"][:, :width],
                sub["attention_mask"][:, :width],
            )
            head_mask = self.mask_table[batch["langs"].index_select(0, rows)].clone() if self._gated else None
            sketches, loss, pred = sketch_batch(
                self.classifier.model, self.classifier.gates, sub, head_mask, self.options
            )
        sketches, loss, pred = to_numpy_rows(sketches, loss, pred)
        return {
            "indices": indices[keep],
            "masks": [self.job.lang_masks[int(lang)] for lang in langs[keep]],
            "sketches": sketches,
            "loss": loss,
            "pred": pred,
        }
