"""What ``crossling analyze`` hands each of its stages: the run, the model and data, and every stage's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl

from analysis.influence import InfluenceOptions
from callbacks.fidelity_sample import FidelityOptions
from callbacks.sketching import SketchOptions


@dataclass
class AnalyzeRequest:
    """One ``analyze`` invocation, resolved (defaults filled, paths absolute).

    Args:
        trainer: the CLI's Trainer (its strategy shards the sketch pass; its loggers receive the report).
        model: the run's ``SequenceClassifier`` (weights are loaded from each checkpoint in turn).
        datamodule: the run's ``TaskDataModule``.
        run_dir: the run directory (``trainer.default_root_dir``).
        conditions: mask conditions (``full``, ``own``, ``random<seed>``, ...).
        compare_to: another run to compare with (an SFT run's full fine-tuning run), or None.
        subnetworks_dir: where ``<lang>.json`` masks are (None: ``<run_dir>/subnetworks``).
    """

    trainer: pl.Trainer
    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    run_dir: Path
    conditions: list[str]
    compare_to: Path | None
    subnetworks_dir: Path | None
    sketch: SketchOptions
    influence: InfluenceOptions
    fidelity: FidelityOptions
    counterfactual: object = field(default=None)  # CounterfactualOptions (stages/counterfactual.py)
    ekfac: object = field(default=None)  # EkfacOptions (stages/ekfac.py)
