"""Adam's preconditioner at a checkpoint, factored per linear layer so that a gradient sketch can carry it.

Why: TracIn's first-order prediction says removing a training example ``z`` changes a test loss by
``η/B · g_testᵀ P g_z``; plain TracIn takes ``P = I``, but AdamW steps along ``P g`` with
``P = 1 / (√v̂ + ε)`` elementwise (``v̂`` the bias-corrected second moment), which can weigh one
parameter's gradient thousands of times more than another's. ``g_testᵀ P g_z = ⟨√P ⊙ g_test, √P ⊙ g_z⟩``,
so scaling both gradients by ``√P`` gives the preconditioned product. The sketch projects a linear
layer's gradient ``Σ_t ∇y_t x̃_tᵀ`` without forming it, which an elementwise scaling would break; a
rank-one ``√P ≈ a bᵀ`` does not: ``a bᵀ ⊙ (∇y x̃ᵀ) = (a ⊙ ∇y)(b ⊙ x̃)ᵀ``, i.e. the projection matrices
scaled by ``a`` and ``b`` (``Sketcher(..., scales=...)``). The factors are Adafactor's (row sums times
column sums over the total), exact when ``√P`` has rank one; each layer records how close they come
(``fidelity``: the cosine between ``√P`` and ``a bᵀ``).

Saved in every epoch checkpoint (its ``adam`` entry, a few hundred kB for e5-small) because the fit
ends by deleting the optimizer state that nothing else reads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def rank_one_factors(root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with ``a bᵀ = r cᵀ / Σ`` (``r``, ``c`` row and column sums of the non-negative ``root``):
    the two are split evenly (each carries ``1/√Σ``). Exact for a rank-one ``root``."""
    total = root.sum()
    if not bool(total > 0):
        raise ValueError("a preconditioner's square root must have a positive sum")
    scale = total.sqrt()
    return root.sum(1) / scale, root.sum(0) / scale


def factor_cosine(root: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(√P, a bᵀ) without forming ``a bᵀ``: ⟨√P, a bᵀ⟩ = aᵀ √P b, ‖a bᵀ‖ = ‖a‖‖b‖."""
    inner = a @ root @ b
    return float(inner / (torch.linalg.vector_norm(root) * torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def adam_root_preconditioner(state: dict, group: dict) -> torch.Tensor:
    """√P = (√(v / (1 − β₂ᵗ)) + ε)^(-1/2) of one parameter, float64: the scaling of each gradient entry."""
    beta2, eps = group["betas"][1], group["eps"]
    step = float(state["step"])
    v = state["exp_avg_sq"].detach().double()
    return (v.div(1.0 - beta2**step).sqrt().add(eps)).rsqrt()


def factor_adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    """Per ``nn.Linear`` of ``model`` that the optimizer has stepped: the factors of √P over ``[W b]``
    (the bias as the last column, as the sketch extends ``x`` with a constant 1). None when the
    optimizer keeps no Adam second moments (another optimizer, or no step taken yet)."""
    found: dict[int, tuple[dict, dict]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state and "step" in state and "betas" in group:
                found[id(p)] = (state, group)
    if not found:
        return None
    layers: dict[str, dict] = {}
    step = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) not in found:
            continue
        state, group = found[id(mod.weight)]
        step = int(float(state["step"]))
        root = adam_root_preconditioner(state, group)
        # the bias is the last column; a parameter the optimizer does not step (or no bias) moves not at
        # all, so its column is zero
        if mod.bias is not None and id(mod.bias) in found:
            bias = adam_root_preconditioner(*found[id(mod.bias)])
        else:
            bias = root.new_zeros(root.shape[0])
        root = torch.cat([root, bias[:, None]], dim=1)
        a, b = rank_one_factors(root)
        # tensors, not arrays: checkpoints load with weights_only=True
        layers[name] = {"out": a.float().cpu(), "in": b.float().cpu(),
                        "fidelity": factor_cosine(root, a, b)}
    if not layers:
        return None
    return {"step": step, "layers": layers}


def preconditioner_scales(record: dict | None, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (out, in + 1) scales of the sketched layers ``names`` from a checkpoint's ``adam`` record; a
    clear error when the checkpoint has none or lacks a layer."""
    if not record:
        raise ValueError("this checkpoint holds no Adam preconditioner (written by fits since crossling "
                         "saved one; fit the run again)")
    missing = [n for n in names if n not in record["layers"]]
    if missing:
        raise ValueError(f"the checkpoint's Adam preconditioner lacks layer(s) {missing[:3]}")
    layers = record["layers"]
    return {n: (np.asarray(layers[n]["out"], dtype=np.float64), np.asarray(layers[n]["in"], dtype=np.float64))
            for n in names}


def mean_fidelity(record: dict, names: list[str] | None = None) -> float:
    """The layers' mean cosine between √P and its factors (a summary of how much the rank-one form keeps)."""
    values = [v["fidelity"] for n, v in record["layers"].items() if names is None or n in names]
    return math.fsum(values) / len(values)
