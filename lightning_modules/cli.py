"""The LightningCLI subcommands of ``crossling`` (``fit``, ``validate``, ``test``, and the study's
stages) over the classifier and the task datamodules; ``main.py`` is the command's entry point.

The run directory is ``trainer.default_root_dir``: per-epoch checkpoints, ``config.yaml``,
metrics and every later stage's outputs live under it (see docs/architecture.md, "Outputs: the run directory").
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

from analysis.influence import InfluenceOptions
from callbacks.checkpoints import EpochCheckpoint
from callbacks.fidelity_sample import FidelityOptions
from callbacks.pruning import SubnetworkOptions
from callbacks.sketching import SketchOptions
from datamodules import TaskDataModule

from .classifier import SequenceClassifier
from .explain import example_texts, print_explanation
from .heap import release_freed_memory
from .precision import PrecisionChoice, accelerator_device_type, resolve_trainer_precision
from .stages import ANALYZE_STAGES, AnalyzeRequest, CounterfactualOptions, EkfacOptions, run_subnetworks


class RunCSVLogger(CSVLogger):
    """CSV metrics in ``<run dir>/logs/metrics.csv``. Only a fresh fit starts the file anew: a resumed
    fit, and every other subcommand (analyze predicts, validate/test append), keep the rows that
    are there (Lightning's logger would delete the file)."""

    keep_previous = True

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
        keep_last_checkpoint: keep ``checkpoints/last.ckpt`` (weights and optimizer state) after the fit
            ends, to train on later with ``--ckpt_path``; by default only an unfinished fit keeps it.
        precision: Lightning's precision (``32-true``, ``bf16-mixed``, ...) or ``auto``: ``bf16-mixed`` where
            the device multiplies bfloat16 natively (CUDA of compute capability 8+, CPUs with AVX-512 BF16 or
            AMX), ``32-true`` elsewhere (``lightning_modules/precision.py``). The run's ``config.yaml``
            records what it resolved to, and the log says why.
        checkpoints_within_epoch: also save checkpoints at these positions inside epochs (0.25 = a quarter
            into the first), ``checkpoints/epoch=<E>-step=<S>.ckpt``, for the counterfactual prediction over
            the part of training where learning happens (``benchmarks/adam_prediction.py``); training is
            unchanged.
    """

    def __init__(
        self,
        *args,
        precision: str | int | None = None,
        wandb: bool = False,
        wandb_project: str = "crossling",
        wandb_mode: Literal["offline", "online"] = "offline",
        keep_last_checkpoint: bool = False,
        checkpoints_within_epoch: list[float] | None = None,
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
            callbacks.append(EpochCheckpoint(keep_last=keep_last_checkpoint, within_epoch=checkpoints_within_epoch))
        kwargs["callbacks"] = callbacks
        self.precision_choice: PrecisionChoice = resolve_trainer_precision(
            precision, accelerator_device_type(kwargs.get("accelerator", "auto"))
        )
        super().__init__(*args, precision=self.precision_choice.precision, **kwargs)
        if self.is_global_zero:
            print(f"crossling: {self.precision_choice.describe()}", flush=True)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, **kwargs):
        for logger in self.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.keep_previous = ckpt_path is not None
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
        return run_subnetworks(model, datamodule, self.default_root_dir, subnetworks, ckpt_path)

    def analyze(
        self,
        model: SequenceClassifier,
        datamodule: TaskDataModule,
        stages: list[Literal["sketch", "influence", "fidelity", "report", "counterfactual", "ekfac"]] | None = None,
        conditions: list[str] | None = None,
        compare_to: str | None = None,
        explain: int | None = None,
        sketch: SketchOptions | None = None,
        influence: InfluenceOptions | None = None,
        fidelity: FidelityOptions | None = None,
        counterfactual: CounterfactualOptions | None = None,
        ekfac: EkfacOptions | None = None,
    ) -> None:
        """Attribute test predictions to training languages with TracIn over the run's checkpoints.

        Args:
            stages: what to run, in order: ``sketch`` (gradient sketches per checkpoint x mask x split),
                ``influence`` (top-m rankings and language contributions), ``fidelity`` (sketched vs exact
                rankings on a sample), ``report`` (figures, tables, report.md/html), ``counterfactual``
                (TracIn's predicted change of test loss when a training language is left out, against fits
                that left it out: ``crossling fit ... --data.init_args.leave_out <lang|random>``).
            conditions: mask conditions: full, own, random<seed>, as-<lang>, union-<a>-<b>, intersect-<a>-<b>.
            compare_to: another run directory (e.g. the full fine-tuning run of an SFT run) to compare with.
            explain: print the top training examples of this test example (dataset index) and stop.
            sketch: the gradient projection (default: the measured-fidelity setting; see docs/measurements.md,
                "Which projection").
            influence: ranking, bootstrap and report options.
            fidelity: sample sizes of the fidelity check.
            counterfactual: where the leave-out fits are and which languages they leave out.
            ekfac: EK-FAC's damping, Fisher and batch sizes (``ekfac``: EK-FAC influence through kronfluence,
                ranked with ``--influence.method ekfac``).
        """
        request = AnalyzeRequest(
            trainer=self,
            model=model,
            datamodule=datamodule,
            run_dir=Path(self.default_root_dir),
            conditions=list(conditions or ["full", "own"]),
            compare_to=Path(compare_to).expanduser().resolve() if compare_to else None,
            subnetworks_dir=Path(model.hparams.subnetworks) if model.hparams.subnetworks else None,
            sketch=sketch or SketchOptions(),
            influence=influence or InfluenceOptions(),
            fidelity=fidelity or FidelityOptions(),
            counterfactual=counterfactual or CounterfactualOptions(),
            ekfac=ekfac or EkfacOptions(),
        )
        if explain is not None:
            print_explanation(request.run_dir, request.conditions[0], explain, example_texts(datamodule))
            return
        for stage in stages or ["sketch", "influence", "report"]:
            print(f"analyze: {stage} ({', '.join(request.conditions)}) in {request.run_dir}", flush=True)
            ANALYZE_STAGES[stage](request)  # lightning_modules/stages/<stage>.py
            release_freed_memory()


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
            config = self.config.clone()
            if "ckpt_path" in config:
                # what the run is, not how this process got there: a fit resumed from last.ckpt writes the
                # config of the fit that ran through (last.ckpt is gone once the fit has ended)
                config.ckpt_path = None
            # what it ran in, not what it asked for: "auto" resolves by the machine (Trainer.precision_choice)
            choice = getattr(trainer, "precision_choice", None)
            if choice is not None and "trainer" in config:
                config.trainer.precision = choice.precision
            self.parser.save(config, str(root / self.config_filename), skip_none=False, overwrite=True,
                             multifile=False)
            write_backbone_record(root, pl_module)
        self.already_saved = True


def write_backbone_record(root: Path, pl_module) -> None:
    """``<run dir>/backbone.json``: which weights the run used (the package's 4-bit file or the hub's),
    with the layer and vocabulary cuts, so the report can say what was studied."""
    from analysis.atomic import write_json_atomic

    from .backbones import describe_backbone

    hp = pl_module.hparams
    if "backbone" not in hp or not hasattr(pl_module, "gates"):
        return  # not a classifier
    record = describe_backbone(hp.backbone)
    record.update(num_layers=hp.get("num_layers"), vocabulary=hp.get("vocabulary", "full"),
                  heads=list(pl_module.gates.shape))
    write_json_atomic(root / "backbone.json", record)


class CrosslingCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "subnetworks": {"model", "datamodule"},
            "analyze": {"model", "datamodule"},
        }

    def _save_subcommand_config(self) -> None:
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(root / f"{self.subcommand}.config.yaml"), skip_none=False,
                             overwrite=True, multifile=False)

    def before_subnetworks(self) -> None:
        self._save_subcommand_config()

    def before_analyze(self) -> None:
        self._save_subcommand_config()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.init_args.backbone")
        parser.link_arguments("data", "model.languages", compute_fn=lambda data: data.languages, apply_on="instantiate")


def run_cli(args: list[str] | None = None) -> CrosslingCLI:
    if args is not None:
        # stages run in-process (the study, tests): the stage's arguments become sys.argv, which
        # LightningCLI parses and a DDP launcher re-executes, so both see the same command
        sys.argv = [sys.argv[0], *args]
    return CrosslingCLI(
        SequenceClassifier,
        TaskDataModule,
        trainer_class=CrosslingTrainer,
        subclass_mode_data=True,
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"enable_checkpointing": False, "use_distributed_sampler": False},
        parser_kwargs={"prog": "crossling"},
        auto_configure_optimizers=False,
    )
