"""Head importance (Michel et al., 2019) and masked accuracy: the two measurements the subnetwork
search repeats at every pruning step.

HI(i,j) = E_x |dL(x)/dxi(i,j)|, the absolute value taken per example, not of the batch gradient:
one backward pass of the summed per-example losses through a per-example B×L×H gate tensor gives
every example's own dL(x)/dxi, because example b's loss depends only on gate row b. Under DDP
sums and counts are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.masks import MaskError
from lightning_modules.gates import HeadGates

Normalization = Literal["layer_l2", "minmax", "none"]


def is_distributed() -> bool:
    """Whether a DDP process group is running (the search then splits examples between ranks)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks in place (unchanged on one process)."""
    if is_distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


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
    packed = all_reduce_sum(
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


def reduce_accuracy(correct: int, total: int, device) -> float:
    """Accuracy over every rank's counts."""
    stats = all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64, device=device))
    correct, total = stats.tolist()
    if total == 0:
        raise ValueError("accuracy needs at least one example; the batches were empty")
    return correct / total


def evaluate_accuracy(model: nn.Module, gates: HeadGates, batches: Iterable[dict], mask=None) -> float:
    """Accuracy of the model with the L×H ``mask`` applied (all-reduced under DDP)."""
    return reduce_accuracy(*count_correct(model, gates, batches, mask), next(model.parameters()).device)
