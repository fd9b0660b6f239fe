"""``SketchCallback``: the ``full``-mask sketches of every training epoch, written during ``fit`` from the
weights in memory, so the sketch stage later finds them done.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl

from .checkpoints import fingerprint
from .sketch_plan import SPLITS, make_jobs, target_identity
from .sketch_writer import JobWriter, rank_share, to_numpy_rows
from .sketching import SketchOptions, get_sketcher, resolve_precision, sketch_batch

log = logging.getLogger(__name__)


class SketchCallback(pl.Callback):
    """Write the ``full``-mask sketches of train and test at the end of every training epoch,
    from the weights in memory (no checkpoint reload). The files are finished (sidecar with the
    checkpoint's fingerprint) once ``checkpoints/epoch=<E>.ckpt`` exists: at the next epoch's
    start or at the end of training.

    Args:
        options: the projection (None: ``SketchOptions()``).
        splits: the splits to sketch.
    """

    def __init__(self, options: SketchOptions | None = None, splits: list[str] | None = None):
        self.options = options or SketchOptions()
        self.splits = list(splits or SPLITS)
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"SketchCallback splits must be among {SPLITS}, found {sorted(unknown)}")
        self._pending: list[tuple[int, JobWriter]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        run_dir = Path(trainer.default_root_dir)
        datamodule = trainer.datamodule
        epoch = trainer.current_epoch
        languages = list(datamodule.languages)
        self.options = replace(self.options, precision=resolve_precision(self.options.precision, pl_module.device))
        sketcher = get_sketcher(pl_module.model, self.options)
        pending_fp = f"pending:epoch={epoch}"
        for split in self.splits:
            dataset = datamodule.dataset(split)

            def identity(split_, mask, epoch=epoch):
                return target_identity(
                    split_, mask, epoch, self.options, sketcher.names, sketcher.dim, pending_fp, languages
                )

            (job,) = make_jobs(
                split,
                epoch,
                run_dir,
                dataset,
                languages,
                ["full"],
                {lang: ["full"] for lang in languages},
                {"full": None},
                identity,
            )
            loader = datamodule.eval_dataloader(split)
            writer = JobWriter(job, rank_share(loader, dataset, job), trainer.global_rank, trainer.world_size)
            writer.open(fresh=True)  # partial files of an interrupted fit may hold other weights' rows
            try:
                self._sketch(loader, writer, pl_module, trainer)
            finally:
                writer.close()
            self._pending.append((epoch, writer))
        trainer.strategy.barrier("sketches of the epoch written")

    def _sketch(self, loader, writer: JobWriter, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        from tqdm.auto import tqdm

        device = pl_module.device
        batches = tqdm(
            loader,
            desc=f"sketch {writer.job.label}",
            leave=False,
            disable=not trainer.is_global_zero or trainer.progress_bar_callback is None,
        )
        for batch in batches:
            indices, langs = batch["indices"].numpy(), batch["langs"].numpy()
            if writer.all_done(indices, langs):
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            sketches, loss, pred = sketch_batch(pl_module.model, pl_module.gates, batch, None, self.options)
            writer.write(indices, writer.route(langs), *to_numpy_rows(sketches, loss, pred))

    def _finish(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        trainer.strategy.barrier("checkpoint written")
        run_dir = Path(trainer.default_root_dir)
        for epoch, writer in self._pending:
            ckpt = run_dir / "checkpoints" / f"epoch={epoch}.ckpt"
            if not ckpt.is_file():
                log.warning(
                    "%s not found: the epoch's sketches stay partial (the sketch stage will redo them)", ckpt
                )
                continue
            if trainer.is_global_zero:
                writer.finish(fingerprint(ckpt))
        self._pending = []
        trainer.strategy.barrier("sketch files finished")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)
