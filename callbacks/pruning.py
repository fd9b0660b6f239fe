"""Iterative head pruning (the paper's Sec. 3.1): one language's subnetwork from the model as it is.

Starting from the fine-tuned model, the heads with the lowest importance are disabled,
``step_fraction`` of all heads at a time, importance recomputed under the current mask at every
step, until the language's dev accuracy falls below a floor (by default ``threshold`` × the
unpruned accuracy, the paper's rule); the last mask at or above that floor is the language's
subnetwork. A search whose floor is not above the majority-class rate is flagged degenerate: it
may prune down to a model no better than always predicting the most frequent label. The stage
that runs this for every language of a run and writes ``subnetworks/<lang>.json`` is
``lightning_modules/stages/subnetworks.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datamodules.base import make_collate
from datamodules.errors import DataError

from .head_importance import (
    Normalization,
    all_reduce_sum,
    compute_head_importance,
    count_correct,
    evaluate_accuracy,
    rank_world,
    reduce_accuracy,
)

FORMAT = 1  # of subnetworks/<lang>.json

ThresholdReference = Literal["unpruned", "majority_gain"]
THRESHOLD_REFERENCES: tuple[str, ...] = ("unpruned", "majority_gain")
TOLERANCE = 1e-12  # float rounding allowed when comparing accuracies with the floor


@dataclass
class SubnetworkOptions:
    """How each language's subnetwork is searched.

    Args:
        threshold: stop when accuracy falls below the floor ``threshold_reference`` derives from it (paper: 0.95).
        threshold_reference: what ``threshold`` is a fraction of. ``unpruned`` (the paper): floor =
            threshold × the unpruned accuracy. ``majority_gain``: floor = majority + threshold ×
            (unpruned − majority), i.e. keep that fraction of what the model gained over always
            predicting the majority class; a model within 5 % of the majority rate otherwise has a
            floor below it, and pruning then removes nearly every head without ever stopping.
        step_fraction: fraction of *all* heads disabled per step, rounded (paper: 0.1, i.e. 14 of 144).
        normalization: how importance is normalised before ranking: ``layer_l2`` (each layer's scores
            divided by their L2 norm: Michel et al. 2019, whose procedure the paper follows), ``minmax``
            (global min-max) or ``none``.
        data_split: the split whose examples estimate head importance (``dev``, ``train`` or ``test``).
        num_examples: importance uses the first ``num_examples`` examples of each language (None: all).
        eval_split: the split whose accuracy decides when to stop (the paper: dev).
        eval_examples: accuracy uses the first ``eval_examples`` examples of each language (None: all).
        batch_size: examples per forward/backward pass (None: the datamodule's ``eval_batch_size``).
        languages: languages to search (None: all of the data's languages).
        device: where to compute (None: the model's device; a model on CPU moves to CUDA when available).
        overwrite: recompute languages whose JSON already matches this checkpoint, data and options.
        progress: show progress bars (languages, pruning steps).
    """

    threshold: float = 0.95
    threshold_reference: ThresholdReference = "unpruned"
    step_fraction: float = 0.1
    normalization: Normalization = "layer_l2"
    data_split: Literal["dev", "train", "test"] = "dev"
    num_examples: int | None = None
    eval_split: Literal["dev", "train", "test"] = "dev"
    eval_examples: int | None = None
    batch_size: int | None = None
    languages: list[str] | None = None
    device: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"subnetworks.threshold must be in (0, 1], found {self.threshold}")
        check_threshold_reference(self.threshold_reference, "subnetworks.threshold_reference")
        if not 0.0 < self.step_fraction < 1.0:
            raise ValueError(f"subnetworks.step_fraction must be in (0, 1), found {self.step_fraction}")
        for key in ("num_examples", "eval_examples", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"subnetworks.{key} must be >= 1 or null, found {value}")

    def search_key(self) -> dict:
        """The options that change a search's result (compared when resuming).

        ``threshold_reference`` is left out at its default, so JSONs written before it existed
        (all under the paper's rule) still match and are not recomputed.
        """
        keys = (
            "threshold",
            "step_fraction",
            "normalization",
            "data_split",
            "num_examples",
            "eval_split",
            "eval_examples",
        )
        key = {k: getattr(self, k) for k in keys}
        if self.threshold_reference != "unpruned":
            key["threshold_reference"] = self.threshold_reference
        return key


def check_threshold_reference(reference: object, where: str) -> None:
    """A ValueError naming ``where`` unless ``reference`` is one of THRESHOLD_REFERENCES."""
    if reference not in THRESHOLD_REFERENCES:
        raise ValueError(f"{where} must be 'unpruned' or 'majority_gain', found {reference!r}")


def stopping_floor(
    base: float, threshold: float, reference: ThresholdReference = "unpruned", majority: float | None = None
) -> float:
    """The accuracy below which pruning stops: ``threshold`` × ``base`` (``unpruned``, the paper),
    or ``majority`` + ``threshold`` × (``base`` − ``majority``) (``majority_gain``)."""
    check_threshold_reference(reference, "threshold_reference")
    if reference == "unpruned":
        return threshold * base
    if majority is None:
        raise ValueError("threshold_reference 'majority_gain' needs the majority-class rate, found None")
    return majority + threshold * (base - majority)


def degenerate_reason(base: float, floor: float, majority: float) -> str | None:
    """Why a search cannot find a subnetwork better than always predicting the majority class
    (None when it can): the unpruned model does not beat that rate, or the floor does not."""
    reasons = []
    if base <= majority + TOLERANCE:
        reasons.append(
            f"the unpruned accuracy {base:.4f} does not beat the majority-class rate {majority:.4f}"
        )
    if floor - TOLERANCE <= majority:  # an accuracy equal to the floor is kept
        reasons.append(
            f"the stopping floor {floor:.4f} is at or below the majority-class rate {majority:.4f}: "
            "the search could not stop above always predicting the majority class"
        )
    return "; ".join(reasons) or None


def heads_per_step(shape: tuple[int, int], step_fraction: float) -> int:
    """round(step_fraction · L · H), half up: 10 % of 144 heads -> 14; at least one head."""
    total = shape[0] * shape[1]
    n = max(1, math.floor(step_fraction * total + 0.5))
    if n >= total:
        raise ValueError(f"step_fraction {step_fraction} disables all {total} heads in one step")
    return n


@dataclass
class PruningResult:
    """The outcome of one language's pruning: the kept mask and how it was reached."""

    mask: np.ndarray
    importance: np.ndarray  # importance of the unpruned model (step 1's ranking)
    trace: list[dict] = field(default_factory=list)
    base_accuracy: float = 0.0
    threshold_accuracy: float = 0.0
    heads_per_step: int = 0
    stop_reason: str = ""
    majority_rate: float | None = None
    threshold_reference: str = "unpruned"
    degenerate_reason: str | None = None  # None: not degenerate (or no majority rate given)

    @property
    def degenerate(self) -> bool:
        return self.degenerate_reason is not None


def prune_heads(
    shape: tuple[int, int],
    importance_fn: Callable[[np.ndarray], np.ndarray],
    evaluate_fn: Callable[[np.ndarray], float],
    threshold: float = 0.95,
    step_fraction: float = 0.1,
    on_step: Callable[[dict], None] | None = None,
    majority_rate: float | None = None,
    reference: ThresholdReference = "unpruned",
) -> PruningResult:
    """Iterative pruning with injected scoring, so the stopping rule can be tested on a script.

    ``importance_fn(mask)`` scores every head under the current L×H 0/1 mask;
    ``evaluate_fn(mask)`` is the accuracy with that mask. Each step disables exactly
    ``heads_per_step`` enabled heads, lowest importance first (ties: lowest layer, then head),
    and evaluates; a step whose accuracy is below the floor (``stopping_floor`` of the unpruned
    accuracy, ``threshold``, ``reference`` and ``majority_rate``) ends the search and is not kept.
    The search also ends before a step would leave no head. With ``majority_rate`` the result
    says whether the search is degenerate (``degenerate_reason``).
    """
    if majority_rate is not None and not 0.0 <= majority_rate <= 1.0:
        raise ValueError(f"majority_rate must be in [0, 1], found {majority_rate}")
    per_step = heads_per_step(shape, step_fraction)
    mask = np.ones(shape, dtype=np.int8)
    base = float(evaluate_fn(mask.copy()))
    floor = stopping_floor(base, threshold, reference, majority_rate)
    result = PruningResult(
        mask=mask.copy(),
        importance=np.zeros(shape),
        base_accuracy=base,
        threshold_accuracy=floor,
        heads_per_step=per_step,
        majority_rate=majority_rate,
        threshold_reference=reference,
    )
    if majority_rate is not None:
        result.degenerate_reason = degenerate_reason(base, floor, majority_rate)
    step = 0
    while True:
        if int(mask.sum()) - per_step < 1:
            result.stop_reason = "no_heads_left"
            break
        step += 1
        importance = np.asarray(importance_fn(mask.copy()), dtype=np.float64)
        if importance.shape != tuple(shape) or not np.isfinite(importance).all():
            raise ValueError(
                f"step {step}: importance must be finite with shape {tuple(shape)}, found {importance}"
            )
        if step == 1:
            result.importance = importance.copy()
        flat = importance.reshape(-1)
        order = np.lexsort((np.arange(flat.size), flat))  # by importance, ties by position
        chosen = [int(i) for i in order if mask.flat[i]][:per_step]
        candidate = mask.copy()
        candidate.flat[chosen] = 0
        accuracy = float(evaluate_fn(candidate.copy()))
        # a tiny tolerance so that e.g. 0.76 counts as reaching 0.95 * 0.8 despite float rounding
        kept = accuracy >= floor - TOLERANCE
        entry = {
            "step": step,
            "disabled": [[i // shape[1], i % shape[1]] for i in chosen],
            "accuracy": accuracy,
            "kept": kept,
            "disabled_total": int(candidate.size - candidate.sum()),
            "importance": importance.tolist(),
        }
        result.trace.append(entry)
        if on_step is not None:
            on_step(entry)
        if not kept:
            result.stop_reason = "accuracy_below_threshold"
            break
        mask = candidate
    result.mask = mask
    return result


def language_examples(datamodule, split: str, lang: str, limit: int | None, where: Path) -> list:
    """The first ``limit`` examples of ``lang`` in ``split`` (all ranks); an error naming ``where`` if none."""
    dataset = datamodule.dataset(split)
    lang_index = list(datamodule.languages).index(lang)
    examples = [e for e in dataset.examples if e.lang == lang_index]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        source = getattr(datamodule, "source", "?")
        raise DataError(
            f"{where}: cannot search the {lang!r} subnetwork: the {split} split has no {lang!r} examples "
            f"(data source {source!r}, task {getattr(datamodule, 'task', '?')}); give {lang} {split} data "
            f"or leave {lang} out of subnetworks.languages"
        )
    return examples


def language_batches(
    datamodule, split: str, lang: str, limit: int | None, batch_size: int, where: Path
) -> list[dict]:
    """This rank's batches of the first ``limit`` examples of ``lang`` in ``split``.

    Examples are split between DDP ranks (every ``world``-th) and sorted by length within a
    rank to cut padding; the importance is a mean and the accuracy a count, so order is moot.
    """
    return rank_batches(datamodule, language_examples(datamodule, split, lang, limit, where), batch_size)


def rank_batches(datamodule, examples: list, batch_size: int) -> list[dict]:
    """This rank's share of ``examples`` (every ``world``-th), sorted by length, collated."""
    rank, world = rank_world()
    mine = sorted(examples[rank::world], key=lambda e: len(e.input_ids))
    collate = make_collate(datamodule.pad_token_id)
    return [collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def majority_rate(batches: list[dict], num_labels: int, device) -> float:
    """Share of the most frequent label among every rank's ``batches``: the accuracy of always
    predicting it, on exactly the examples the accuracy is counted on (counts all-reduced)."""
    counts = torch.zeros(num_labels, dtype=torch.float64, device=device)
    for batch in batches:
        labels = batch["labels"]
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_labels:
            raise ValueError(f"labels must be in [0, {num_labels}), found {sorted(set(labels.tolist()))}")
        counts += torch.bincount(labels, minlength=num_labels).to(counts)
    counts = all_reduce_sum(counts)
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the majority-class rate needs at least one example; the batches were empty")
    return float(counts.max()) / total


def importance_within_eval(options: SubnetworkOptions) -> bool:
    """True when the importance examples are the first ones of the accuracy examples: then one
    forward pass over them serves both (the search needs importance and accuracy at every mask)."""
    if options.data_split != options.eval_split:
        return False
    if options.eval_examples is None:
        return True
    return options.num_examples is not None and options.num_examples <= options.eval_examples


def prune_language(
    module, datamodule, lang: str, options: SubnetworkOptions, path: Path | None = None
) -> dict:
    """One language's subnetwork search on ``module`` (a SequenceClassifier) as it is now.

    Returns the JSON record without the checkpoint fields; ``path`` (the JSON it will be
    written to) only names the target in errors.
    """
    from tqdm.auto import tqdm

    path = path or Path("subnetworks") / f"{lang}.json"
    model, gates = module.model, module.gates
    shape = gates.shape
    batch_size = options.batch_size or getattr(datamodule, "eval_batch_size", 64)
    importance_data = language_batches(
        datamodule, options.data_split, lang, options.num_examples, batch_size, path
    )
    eval_data = language_batches(
        datamodule, options.eval_split, lang, options.eval_examples, batch_size, path
    )
    counts = torch.tensor(
        [sum(len(b["labels"]) for b in importance_data), sum(len(b["labels"]) for b in eval_data)],
        dtype=torch.float64,
        device=next(model.parameters()).device,
    )
    n_importance, n_eval = (int(c) for c in all_reduce_sum(counts).tolist())
    majority = majority_rate(eval_data, model.config.num_labels, counts.device)

    def importance_fn(mask: np.ndarray) -> np.ndarray:
        if (key := mask.tobytes()) in reused:
            return reused.pop(key)
        return compute_head_importance(model, importance_data, mask, options.normalization, gates).numpy()

    # importance at mask M is needed right after accuracy at M (the step that kept M): when the
    # importance examples lead the accuracy examples, one pass gives both, and only the rest of
    # the accuracy examples need a forward pass of their own
    reused: dict[bytes, np.ndarray] = {}
    fused = importance_within_eval(options)
    if fused:
        head = len(language_examples(datamodule, options.data_split, lang, options.num_examples, path))
        rest = language_examples(datamodule, options.eval_split, lang, options.eval_examples, path)[head:]
        rest_data = rank_batches(datamodule, rest, batch_size)

    def evaluate_fn(mask: np.ndarray) -> float:
        if not fused:
            return evaluate_accuracy(model, gates, eval_data, mask)
        per_batch: list[int] = []
        importance = compute_head_importance(model, importance_data, mask, options.normalization, gates, per_batch)
        reused.clear()
        reused[mask.tobytes()] = importance.numpy()
        correct, total = count_correct(model, gates, rest_data, mask)
        seen = sum(len(b["labels"]) for b in importance_data)
        return reduce_accuracy(correct + sum(per_batch), total + seen, next(model.parameters()).device)

    max_steps = (shape[0] * shape[1] - 1) // heads_per_step(shape, options.step_fraction)
    show = options.progress and rank_world()[0] == 0
    with tqdm(total=max_steps, desc=f"prune {lang}", unit="step", leave=False, disable=not show) as bar:

        def on_step(entry: dict) -> None:
            bar.update(1)
            bar.set_postfix(acc=f"{entry['accuracy']:.3f}", off=entry["disabled_total"])

        result = prune_heads(
            shape,
            importance_fn,
            evaluate_fn,
            options.threshold,
            options.step_fraction,
            on_step,
            majority,
            options.threshold_reference,
        )
    return {
        "format": FORMAT,
        "language": lang,
        "mask": result.mask.astype(int).tolist(),
        "importance": result.importance.tolist(),
        "trace": result.trace,
        "base_accuracy": result.base_accuracy,
        "threshold": options.threshold,
        "threshold_reference": options.threshold_reference,
        "threshold_accuracy": result.threshold_accuracy,
        "majority_rate": result.majority_rate,
        "degenerate": result.degenerate,
        "degenerate_reason": result.degenerate_reason,
        "step_fraction": options.step_fraction,
        "heads_per_step": result.heads_per_step,
        "disabled_heads": int(result.mask.size - result.mask.sum()),
        "stop_reason": result.stop_reason,
        "normalization": options.normalization,
        "data_split": options.data_split,
        "num_examples": n_importance,
        "eval_split": options.eval_split,
        "num_eval_examples": n_eval,
    }
