"""The influence stage's options and errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..tracin import NORMALIZATIONS

METHODS = ("tracin", "trak", "repsim", "ekfac")  # analysis/influence/methods.py


class InfluenceError(ValueError):
    """An input file the influence stage cannot use; the message names the file and key."""


class MissingInputs(InfluenceError):
    """Files a condition needs that do not exist (yet): the sketch stage has not produced them."""

    def __init__(self, condition: str, paths: list[Path]):
        self.condition = condition
        self.paths = paths
        shown = ", ".join(str(p) for p in paths[:6]) + (
            f" (+{len(paths) - 6} more)" if len(paths) > 6 else ""
        )
        super().__init__(f"condition {condition!r}: missing input(s): {shown}")


@dataclass
class InfluenceOptions:
    """Options of the influence and report stages.

    Args:
        m: training examples kept per test example and sign (the paper's top-m, m=100).
        normalization: ``cosine`` (both gradients unit norm per checkpoint), ``train-norm`` (training
            gradient only) or ``dot`` (plain TracIn).
        lr_weights: per-checkpoint weights of the summed score (e.g. the learning rate at each epoch), in
            epoch order; None weighs every checkpoint 1.
        epochs: checkpoints to sum over; None uses every ``sketches/epoch=<E>`` directory.
        train_per_language: rank only this many training examples per language (the same items in
            every language of a parallel task; seeded from item ids, see ``callbacks.sketch_plan.train_pool``),
            so that a study on a small machine sketches fewer rows; None ranks the whole training split.
        per_checkpoint: also rank by each checkpoint alone (needed by the dynamics figures and Fig 7).
        precision: float64 (exact to rounding; the default) or float32 (~1e-6 relative error; faster only at
            large d: measured 1.4-3x at d=4096, no gain at d=256, benchmarks/ranking_time.py).
        memory_mb: working-set budget of the streaming ranking when block sizes are not given.
        train_block: training rows per block (None: planned from memory_mb).
        test_block: test rows per block (None: planned from memory_mb).
        bootstrap_resamples: bootstrap resamples for every confidence interval.
        ci_level: confidence level of the intervals.
        seed: base seed of the bootstrap (combined with names, so each table has its own stream).
        focus_language: test language of the random/suboptimal-mask figure (paper Fig 3: German).
        explain_per_language: drill-down examples per test language in the report.
        explain_top: training examples shown per sign in a drill-down.
        texts: optional JSON file ``{"train": {"<index>": text}, "test": {...}}`` for drill-downs.
        exact_run: optional run directory ranked from exact gradients, for the fidelity table.
        run_kind: which training produced the run (labels the paper's figure numbers); ``auto``
            guesses from the run directory's name (``sft``/``random``).
        strict: raise on a condition with missing sketches instead of skipping it.
        method: how scores are formed from the sketches (``analysis/influence/methods.py``): ``tracin``
            (the paper's; rankings in ``influence/``), ``trak`` (TRAK's kernel; ``influence-trak/``), ``repsim``
            (cosine of the sentence representations the sketch stage wrote with ``sketch.kind: representation``;
            ``influence-repsim/``) or ``ekfac`` (EK-FAC influence the ekfac stage scored through kronfluence,
            full model only; ``influence-ekfac/``).
        trak_damping: TRAK's λ as a multiple of the mean eigenvalue of the training sketches' ΦᵀΦ.
        wandb: log the report to the active W&B run, if there is one.
    """

    m: int = 100
    normalization: Literal["cosine", "train-norm", "dot"] = "cosine"
    lr_weights: list[float] | None = None
    epochs: list[int] | None = None
    train_per_language: int | None = None
    per_checkpoint: bool = True
    precision: Literal["float64", "float32"] = "float64"
    memory_mb: float = 1024.0
    train_block: int | None = None
    test_block: int | None = None
    bootstrap_resamples: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    focus_language: str = "de"
    explain_per_language: int = 2
    explain_top: int = 3
    texts: str | None = None
    exact_run: str | None = None
    run_kind: Literal["auto", "full", "sft", "sft-random"] = "auto"
    strict: bool = False
    wandb: bool = True
    method: Literal["tracin", "trak", "repsim", "ekfac"] = "tracin"
    trak_damping: float = 0.1

    def ranking_fields(self) -> dict:
        """The options a ranking depends on (block sizes do not change an exact result)."""
        fields = {
            "m": self.m,
            "normalization": self.normalization,
            "lr_weights": self.lr_weights,
            "per_checkpoint": self.per_checkpoint,
            "precision": self.precision,
        }
        if self.method != "tracin":  # TracIn's key stays what rankings written before methods existed hold
            fields.update(method=self.method, trak_damping=self.trak_damping)
        return fields

    def check(self) -> None:
        if self.m < 1:
            raise InfluenceError(f"options: m must be at least 1, found {self.m}")
        if self.train_per_language is not None and self.train_per_language < 1:
            raise InfluenceError(
                f"options: train_per_language must be at least 1 (or null: all), found {self.train_per_language}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise InfluenceError(
                f"options: normalization must be one of {NORMALIZATIONS}, found {self.normalization!r}"
            )
        if self.method not in METHODS:
            raise InfluenceError(f"options: method must be one of {METHODS}, found {self.method!r}")
        if not self.trak_damping > 0:
            raise InfluenceError(f"options: trak_damping must be > 0, found {self.trak_damping}")
        if self.bootstrap_resamples < 1:
            raise InfluenceError(
                f"options: bootstrap_resamples must be at least 1, found {self.bootstrap_resamples}"
            )
        if not 0 < self.ci_level < 1:
            raise InfluenceError(f"options: ci_level must be in (0, 1), found {self.ci_level}")

