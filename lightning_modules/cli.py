"""The ``crossling`` command: LightningCLI subcommands (``fit``, ``validate``, ``test``, and the
study's stages) over the classifier and the task datamodules.

The run directory is ``trainer.default_root_dir``: per-epoch checkpoints, ``config.yaml``,
metrics and every later stage's outputs live under it (see README, "Outputs").
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Literal

from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment

from analysis.masks import MaskError
from callbacks.checkpoints import CheckpointError, EpochCheckpoint, list_checkpoints
from callbacks.subnetworks import SubnetworkOptions, find_subnetworks
from datamodules import DataError, TaskDataModule

from .classifier import SequenceClassifier


class RunCSVLogger(CSVLogger):
    """CSV metrics in ``<run dir>/logs/metrics.csv``; a resumed fit keeps the earlier epochs' rows
    (Lightning's logger would delete the file)."""

    keep_previous = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        previous = []
        if self.keep_previous and path.is_file():
            with open(path, newline="") as f:
                previous = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        experiment = super().experiment
        experiment.metrics = previous + experiment.metrics
        return experiment


class CrosslingTrainer(Trainer):
    """Lightning's Trainer with crossling's defaults: a CSV log and ``config.yaml`` in the run
    directory, per-epoch checkpoints, an optional W&B run, and samplers that crossling
    shards itself (so language-homogeneous batches stay aligned across DDP ranks).

    Args:
        wandb: also log to Weights & Biases.
        wandb_project: the W&B project.
        wandb_mode: ``offline`` (no network; sync later with ``wandb sync``) or ``online``.
    """

    def __init__(
        self,
        *args,
        wandb: bool = False,
        wandb_project: str = "crossling",
        wandb_mode: Literal["offline", "online"] = "offline",
        **kwargs,
    ):
        # crossling's own samplers shard by rank; its EpochCheckpoint replaces ModelCheckpoint
        kwargs["use_distributed_sampler"] = False
        if kwargs.get("enable_checkpointing") is None:
            kwargs["enable_checkpointing"] = False
        root = Path(kwargs.get("default_root_dir") or ".").expanduser().resolve()
        kwargs["default_root_dir"] = str(root)
        if kwargs.get("logger") in (None, True):
            loggers = [RunCSVLogger(save_dir=str(root), name="", version="logs")]
            if wandb:
                from pytorch_lightning.loggers import WandbLogger

                loggers.append(
                    WandbLogger(project=wandb_project, name=root.name, save_dir=str(root), offline=wandb_mode == "offline")
                )
            kwargs["logger"] = loggers
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, EpochCheckpoint) for c in callbacks):
            callbacks.append(EpochCheckpoint())
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, **kwargs):
        if ckpt_path is not None:
            for logger in self.loggers:
                if isinstance(logger, RunCSVLogger):
                    logger.keep_previous = True
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)

    def subnetworks(
        self,
        model: SequenceClassifier,
        datamodule: TaskDataModule,
        ckpt_path: str | None = None,
        subnetworks: SubnetworkOptions | None = None,
    ) -> dict[str, Path]:
        """Find each language's subnetwork by head-importance pruning of a fine-tuned checkpoint.

        Args:
            ckpt_path: the fine-tuned checkpoint (default: the run's last ``checkpoints/epoch=<E>.ckpt``).
            subnetworks: the search's options (threshold, step fraction, normalisation, data).
        """
        run_dir = Path(self.default_root_dir)
        if ckpt_path is None:
            found = list_checkpoints(run_dir)
            if not found:
                raise CheckpointError(f"no checkpoints/epoch=<E>.ckpt in {run_dir}: give --ckpt_path or run fit first")
            ckpt_path = str(found[-1][1])
        return find_subnetworks(model, datamodule, run_dir, subnetworks or SubnetworkOptions(), ckpt_path)


class RunDirConfig(SaveConfigCallback):
    """Write the resolved config of ``fit`` to ``<run dir>/config.yaml`` (replayable with ``--config``).

    Other subcommands write theirs as ``<run dir>/<subcommand>.config.yaml`` (see CrosslingCLI),
    so that analysing a run never overwrites the config that trained it.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or stage != "fit":
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(root / self.config_filename), skip_none=False, overwrite=True,
                             multifile=False)
        self.already_saved = True


class CrosslingCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "subnetworks": {"model", "datamodule"},
        }

    def _save_subcommand_config(self) -> None:
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(root / f"{self.subcommand}.config.yaml"), skip_none=False,
                             overwrite=True, multifile=False)

    def before_subnetworks(self) -> None:
        self._save_subcommand_config()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.init_args.backbone")
        parser.link_arguments("data", "model.languages", compute_fn=lambda data: data.languages, apply_on="instantiate")


def run_cli(args: list[str] | None = None) -> CrosslingCLI:
    return CrosslingCLI(
        SequenceClassifier,
        TaskDataModule,
        trainer_class=CrosslingTrainer,
        subclass_mode_data=True,
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"enable_checkpointing": False, "use_distributed_sampler": False},
        args=args,
        parser_kwargs={"prog": "crossling"},
        auto_configure_optimizers=False,
    )


USER_ERRORS = (DataError, CheckpointError, MaskError, FileNotFoundError)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] == "study":
            from .study import study_main

            study_main(args[1:])
        elif args and args[0] == "pretrain":
            from .pretrain import run_pretrain_cli

            run_pretrain_cli(args[1:])
        else:
            run_cli(argv)
    except Exception as err:
        # jsonargparse wraps errors raised while building classes: look down the chain
        found, seen = err, set()
        while found is not None and not isinstance(found, USER_ERRORS) and id(found) not in seen:
            seen.add(id(found))
            found = found.__cause__ or found.__context__
        if not isinstance(found, USER_ERRORS):
            raise
        print(f"crossling: error: {found}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
