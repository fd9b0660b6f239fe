"""The ``crossling`` command: LightningCLI subcommands (``fit``, ``validate``, ``test``, and the
study's stages) over the classifier and the task datamodules.

The run directory is ``trainer.default_root_dir``: per-epoch checkpoints, ``config.yaml``,
metrics and every later stage's outputs live under it (see README, "Outputs").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger

from analysis.masks import MaskError
from callbacks.checkpoints import CheckpointError, EpochCheckpoint
from datamodules import DataError, TaskDataModule

from .classifier import SequenceClassifier


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
            loggers = [CSVLogger(save_dir=str(root), name="", version="logs")]
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


class RunDirConfig(SaveConfigCallback):
    """Write the resolved config to ``<run dir>/config.yaml`` (replayable with ``--config``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(root / self.config_filename), skip_none=False, overwrite=True,
                             multifile=False)
        self.already_saved = True


class CrosslingCLI(LightningCLI):
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
    except USER_ERRORS as err:
        print(f"crossling: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
