"""Language subnetworks (the paper's Sec. 3.1): head importance and iterative head pruning.

For each language, starting from the fine-tuned model, the heads with the lowest importance
HI(i,j) = E_x |dL(x)/dxi(i,j)| (Michel et al., 2019) are disabled, ``step_fraction`` of all
heads at a time, importance recomputed under the current mask at every step, until the
language's dev accuracy falls below ``threshold`` × the unpruned accuracy; the last mask
at or above that floor is the language's subnetwork (``subnetworks/<lang>.json``).

The absolute value is taken per example, not of the batch gradient: one backward pass of
the summed per-example losses through a per-example B×L×H gate tensor gives every
example's own dL(x)/dxi, because example b's loss depends only on gate row b.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from analysis.atomic import write_json_atomic as _atomic_write_json
from analysis.mask_stats import write_mask_statistics
from analysis.masks import MaskError, check_mask
from datamodules.base import make_collate
from datamodules.errors import DataError
from lightning_modules.gates import HeadGates

from .checkpoints import fingerprint, list_checkpoints, load_weights

log = logging.getLogger(__name__)

Normalization = Literal["layer_l2", "minmax", "none"]
FORMAT = 1


@dataclass
class SubnetworkOptions:
    """How each language's subnetwork is searched.

    Args:
        threshold: stop when accuracy falls below ``threshold`` × the unpruned model's accuracy (paper: 0.95).
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
        if not 0.0 < self.step_fraction < 1.0:
            raise ValueError(f"subnetworks.step_fraction must be in (0, 1), found {self.step_fraction}")
        for key in ("num_examples", "eval_examples", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"subnetworks.{key} must be >= 1 or null, found {value}")

    def search_key(self) -> dict:
        """The options that change a search's result (compared when resuming)."""
        keys = (
            "threshold",
            "step_fraction",
            "normalization",
            "data_split",
            "num_examples",
            "eval_split",
            "eval_examples",
        )
        return {k: getattr(self, k) for k in keys}


# -- distributed helpers ----------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# -- head importance --------------------------------------------------------------------------


def _gate_dtype(model: nn.Module) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _base_mask(mask, shape: tuple[int, int], device, dtype) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, device=device, dtype=dtype)
    mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    if tuple(mask.shape) != tuple(shape):
        raise MaskError(
            f"head mask has shape {tuple(mask.shape)}, the model has {tuple(shape)} (layers x heads)"
        )
    return mask.to(device=device, dtype=dtype)


def accumulate_head_gradients(
    model: nn.Module, gates: HeadGates, batches: Iterable[dict], mask=None, correct: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Σ_x |dL(x)/dxi| (L×H, float64) over this process's examples, and their number.

    ``mask`` (L×H, None = all ones) is the point where the gradient is taken: disabled heads
    stay off. The model runs in eval mode (no dropout); its train/eval mode is restored after.
    ``correct``, when given, receives each batch's number of correct predictions (the forward
    pass is the one accuracy at ``mask`` needs, so the pruning search reuses it).
    """
    device = next(model.parameters()).device
    dtype = _gate_dtype(model)
    base = _base_mask(mask, gates.shape, device, dtype)
    total = torch.zeros(gates.shape, dtype=torch.float64, device=device)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                size = ids.shape[0]
                gate = base.expand(size, *gates.shape).clone().requires_grad_(True)
                with gates.applied(gate, size):
                    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                labels = batch["labels"].to(device)
                if correct is not None:
                    correct.append(int((logits.argmax(-1) == labels).sum()))
                loss = F.cross_entropy(logits, labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, gate)
                total += grad.abs().sum(0).to(torch.float64)
                count += size
    finally:
        model.train(was_training)
    return total, count


def normalize_importance(importance, normalization: Normalization = "layer_l2", mask=None) -> torch.Tensor:
    """Zero the disabled heads' scores, then normalise over the enabled heads.

    Disabled heads are no longer part of the subnetwork, so their would-be gradient must
    not rescale the scores of the heads still competing. ``layer_l2``: each layer divided
    by its L2 norm (Michel et al.); ``minmax``: (s - min) / (max - min) over enabled heads.
    """
    imp = torch.as_tensor(importance, dtype=torch.float64).clone()
    enabled = (
        torch.ones_like(imp, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(imp.device) != 0
    )
    imp = torch.where(enabled, imp, torch.zeros_like(imp))
    if normalization == "none":
        return imp
    if normalization == "layer_l2":
        norms = imp.pow(2).sum(-1, keepdim=True).sqrt()
        return imp / torch.where(norms > 0, norms, torch.ones_like(norms))
    if normalization == "minmax":
        live = imp[enabled]
        if live.numel() == 0:
            return imp
        lo, hi = live.min(), live.max()
        scaled = (imp - lo) / (hi - lo) if hi > lo else torch.zeros_like(imp)
        return torch.where(enabled, scaled, torch.zeros_like(imp))
    raise ValueError(f"unknown normalization {normalization!r}: expected layer_l2, minmax or none")


def compute_head_importance(
    model: nn.Module,
    batches: Iterable[dict],
    mask=None,
    normalization: Normalization = "layer_l2",
    gates: HeadGates | None = None,
    correct: list[int] | None = None,
) -> torch.Tensor:
    """HI(i,j) = E_x |dL(x)/dxi(i,j)| over the batches, at ``mask``, normalised (L×H float64, CPU).

    ``model`` is a transformers sequence classifier (``SequenceClassifier.model``); ``gates`` its
    HeadGates (installed temporarily when None). Batches are dicts with ``input_ids``,
    ``attention_mask`` and ``labels``. Under DDP the sums and counts are all-reduced before the
    mean and normalisation, so every rank returns the same scores.
    """
    own = gates is None
    gates = gates if gates is not None else HeadGates(model)
    try:
        total, count = accumulate_head_gradients(model, gates, batches, mask, correct)
    finally:
        if own:
            gates.remove()
    packed = _all_reduce_sum(
        torch.cat([total.flatten(), torch.tensor([float(count)], device=total.device, dtype=torch.float64)])
    )
    count = int(packed[-1].item())
    if count == 0:
        raise ValueError("head importance needs at least one example; the batches were empty")
    importance = (packed[:-1] / count).reshape(gates.shape).cpu()
    return normalize_importance(
        importance,
        normalization,
        None if mask is None else _base_mask(mask, gates.shape, "cpu", torch.float64),
    )


@torch.no_grad()
def count_correct(model: nn.Module, gates: HeadGates, batches: Iterable[dict], mask=None) -> tuple[int, int]:
    """(correct predictions, examples) of this process's batches with the L×H ``mask`` applied."""
    device = next(model.parameters()).device
    gate = None if mask is None else _base_mask(mask, gates.shape, device, _gate_dtype(model))
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            with gates.applied(gate):
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
            correct += int((logits.argmax(-1) == batch["labels"].to(device)).sum())
            total += ids.shape[0]
    finally:
        model.train(was_training)
    return correct, total


def _accuracy(correct: int, total: int, device) -> float:
    stats = _all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64, device=device))
    correct, total = stats.tolist()
    if total == 0:
        raise ValueError("accuracy needs at least one example; the batches were empty")
    return correct / total


def evaluate_accuracy(model: nn.Module, gates: HeadGates, batches: Iterable[dict], mask=None) -> float:
    """Accuracy of the model with the L×H ``mask`` applied (all-reduced under DDP)."""
    return _accuracy(*count_correct(model, gates, batches, mask), next(model.parameters()).device)


# -- pruning ----------------------------------------------------------------------------------


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


def prune_heads(
    shape: tuple[int, int],
    importance_fn: Callable[[np.ndarray], np.ndarray],
    evaluate_fn: Callable[[np.ndarray], float],
    threshold: float = 0.95,
    step_fraction: float = 0.1,
    on_step: Callable[[dict], None] | None = None,
) -> PruningResult:
    """Iterative pruning with injected scoring, so the stopping rule can be tested on a script.

    ``importance_fn(mask)`` scores every head under the current L×H 0/1 mask;
    ``evaluate_fn(mask)`` is the accuracy with that mask. Each step disables exactly
    ``heads_per_step`` enabled heads, lowest importance first (ties: lowest layer, then head),
    and evaluates; a step whose accuracy is below ``threshold`` × the unpruned accuracy ends
    the search and is not kept. The search also ends before a step would leave no head.
    """
    per_step = heads_per_step(shape, step_fraction)
    mask = np.ones(shape, dtype=np.int8)
    base = float(evaluate_fn(mask.copy()))
    floor = threshold * base
    result = PruningResult(mask.copy(), np.zeros(shape), [], base, floor, per_step, "")
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
        kept = accuracy >= floor - 1e-12
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


# -- data -------------------------------------------------------------------------------------


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
    rank, world = _rank_world()
    mine = sorted(examples[rank::world], key=lambda e: len(e.input_ids))
    collate = make_collate(datamodule.tokenizer.pad_token_id)
    return [collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def importance_within_eval(options: SubnetworkOptions) -> bool:
    """True when the importance examples are the first ones of the accuracy examples: then one
    forward pass over them serves both (the search needs importance and accuracy at every mask)."""
    if options.data_split != options.eval_split:
        return False
    if options.eval_examples is None:
        return True
    return options.num_examples is not None and options.num_examples <= options.eval_examples


def _data_key(datamodule, options: SubnetworkOptions) -> dict:
    """What decides which examples the search sees (compared when resuming)."""
    sizes = getattr(datamodule, "sizes", {})
    splits = sorted({options.data_split, options.eval_split})
    return {
        "datamodule": type(datamodule).__name__,
        "languages": list(datamodule.languages),
        "source": getattr(datamodule, "source", None),
        "data_dir": getattr(datamodule, "data_dir", None),
        "hub_id": getattr(datamodule, "hub_id", None),
        "sizes": {split: sizes.get(split) for split in splits} if isinstance(sizes, dict) else None,
        "seed": getattr(datamodule, "seed", None),
        "max_length": getattr(datamodule, "max_length", None),
    }


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
    n_importance, n_eval = (int(c) for c in _all_reduce_sum(counts).tolist())

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
        return _accuracy(correct + sum(per_batch), total + seen, next(model.parameters()).device)

    max_steps = (shape[0] * shape[1] - 1) // heads_per_step(shape, options.step_fraction)
    show = options.progress and _rank_world()[0] == 0
    with tqdm(total=max_steps, desc=f"prune {lang}", unit="step", leave=False, disable=not show) as bar:

        def on_step(entry: dict) -> None:
            bar.update(1)
            bar.set_postfix(acc=f"{entry['accuracy']:.3f}", off=entry["disabled_total"])

        result = prune_heads(
            shape, importance_fn, evaluate_fn, options.threshold, options.step_fraction, on_step
        )
    return {
        "format": FORMAT,
        "language": lang,
        "mask": result.mask.astype(int).tolist(),
        "importance": result.importance.tolist(),
        "trace": result.trace,
        "base_accuracy": result.base_accuracy,
        "threshold": options.threshold,
        "threshold_accuracy": result.threshold_accuracy,
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


# -- the search over a run --------------------------------------------------------------------


def state_fingerprint(module: nn.Module) -> str:
    """A content hash of a module's weights, for a search run on an in-memory model."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()[:16]



def _is_done(path: Path, fp: str, options: SubnetworkOptions, data_key: dict, shape: tuple[int, int]) -> bool:
    """Whether ``path`` already holds this checkpoint's subnetwork under these options and data."""
    if options.overwrite or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable, recomputing it", path)
        return False
    if not isinstance(data, dict):
        return False
    same = (
        data.get("checkpoint_fingerprint") == fp
        and data.get("options") == options.search_key()
        and data.get("data") == data_key
    )
    if same:
        check_mask(
            data.get("mask"), shape, f"{path}: key 'mask'"
        )  # same model: a wrong shape is a broken file
    return same


def _pick_device(module: nn.Module, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    current = next(module.parameters()).device
    if current.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return current


def find_subnetworks(
    module,
    datamodule,
    run_dir: str | Path,
    options: SubnetworkOptions | None = None,
    ckpt_path: str | Path | None = None,
) -> dict[str, Path]:
    """Search every language's subnetwork and write ``<run_dir>/subnetworks/<lang>.json`` + ``stats/``.

    ``module`` is a SequenceClassifier (its ``.model`` and ``.gates`` are used); with
    ``ckpt_path`` its weights are first loaded from that crossling checkpoint. Languages whose
    JSON already records this checkpoint's fingerprint, the same data and the same options
    are skipped, so an interrupted search resumes. Returns language -> JSON path, plus
    ``"stats"`` -> the statistics folder.
    """
    options = options or SubnetworkOptions()
    run_dir = Path(run_dir)
    out_dir = run_dir / "subnetworks"
    checkpoint_meta: dict = {}
    if ckpt_path is not None:
        checkpoint_meta = load_weights(module, ckpt_path)
        fp = fingerprint(ckpt_path)
    else:
        fp = state_fingerprint(module)
    all_languages = list(datamodule.languages)
    languages = list(options.languages) if options.languages else all_languages
    unknown = [lang for lang in languages if lang not in all_languages]
    if unknown:
        raise DataError(f"subnetworks.languages: {unknown} not among the data's languages {all_languages}")
    languages = [lang for lang in all_languages if lang in languages]  # the data's order

    module.to(_pick_device(module, options.device))
    shape = module.gates.shape
    heads_per_step(shape, options.step_fraction)  # fail before any work if the step is impossible
    data_key = _data_key(datamodule, options)
    rank, _ = _rank_world()

    todo = [
        lang for lang in languages if not _is_done(out_dir / f"{lang}.json", fp, options, data_key, shape)
    ]
    if _distributed():  # one decision for all ranks, so the collectives stay in step
        box = [todo]
        torch.distributed.broadcast_object_list(box, src=0)
        todo = box[0]
    for lang in todo:  # every language's data is there before hours are spent on the first
        for split, limit in (
            (options.data_split, options.num_examples),
            (options.eval_split, options.eval_examples),
        ):
            language_examples(datamodule, split, lang, limit, out_dir / f"{lang}.json")
    skipped = [lang for lang in languages if lang not in todo]
    if skipped and rank == 0:
        log.info("subnetworks: %s already done for checkpoint %s; skipping", skipped, fp)

    from tqdm.auto import tqdm

    show = options.progress and rank == 0
    for lang in tqdm(todo, desc="subnetworks", unit="lang", disable=not show):
        path = out_dir / f"{lang}.json"
        record = prune_language(module, datamodule, lang, options, path)
        record.update(
            {
                "checkpoint": None if ckpt_path is None else str(ckpt_path),
                "checkpoint_epoch": checkpoint_meta.get("epoch"),
                "checkpoint_fingerprint": fp,
                "options": options.search_key(),
                "data": data_key,
            }
        )
        if rank == 0:
            _atomic_write_json(path, record)
            log.info(
                "subnetwork %s: base accuracy %.4f, %d of %d heads disabled (%s)",
                lang,
                record["base_accuracy"],
                record["disabled_heads"],
                shape[0] * shape[1],
                record["stop_reason"],
            )
    paths = {lang: out_dir / f"{lang}.json" for lang in languages}
    if _distributed():
        torch.distributed.barrier()
    if rank == 0:
        write_mask_statistics(out_dir, languages)
    if _distributed():
        torch.distributed.barrier()
    paths["stats"] = out_dir / "stats"
    return paths


class SubnetworkSearch(pl.Callback):
    """Run the subnetwork search on the just-trained model when ``fit`` ends.

    The weights are taken from the run's last ``checkpoints/epoch=<E>.ckpt`` (the same as
    the in-memory model), so the JSON names a checkpoint later stages can fingerprint.

    Args:
        options: the search options (``SubnetworkOptions``).
    """

    def __init__(self, options: SubnetworkOptions | None = None):
        self.options = options or SubnetworkOptions()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "interrupted", False):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise DataError("SubnetworkSearch needs a TaskDataModule (fit was given bare dataloaders)")
        checkpoints = list_checkpoints(trainer.default_root_dir)
        ckpt = checkpoints[-1][1] if checkpoints else None
        find_subnetworks(pl_module, datamodule, Path(trainer.default_root_dir), self.options, ckpt)


__all__ = [
    "SubnetworkOptions",
    "SubnetworkSearch",
    "PruningResult",
    "accumulate_head_gradients",
    "compute_head_importance",
    "evaluate_accuracy",
    "find_subnetworks",
    "heads_per_step",
    "language_batches",
    "language_examples",
    "normalize_importance",
    "prune_heads",
    "prune_language",
]
