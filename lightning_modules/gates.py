"""Head gates: one multiplicative gate per layer and attention head.

transformers 5 removed ``head_mask``, so crossling gates heads itself: a forward pre-hook on
each layer's attention output projection multiplies each head's slice of the projection's
input (the concatenated per-head contexts) by its gate. A zero gate therefore removes the
head exactly as zeroing its columns of the output projection would; all-ones gates leave
the computation untouched (x * 1.0 is exact), and the gates carry gradients, which is the
head-importance signal. The hook sits after the attention kernel, so it works for eager
and SDPA attention alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def attention_output_projections(model: nn.Module) -> list[nn.Linear]:
    """Each encoder layer's attention output projection (``layer.attention.output.dense``)."""
    base = getattr(model, "base_model", model)
    layers = base.encoder.layer
    return [layer.attention.output.dense for layer in layers]


def attention_self_modules(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "base_model", model)
    return [layer.attention.self for layer in base.encoder.layer]


class HeadGates:
    """Installs gate hooks on a model; ``mask`` is None (no gating), L×H, or B×L×H.

    Use ``with gates.applied(mask): model(...)`` so the mask never outlives the call.
    """

    def __init__(self, model: nn.Module):
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.projections = attention_output_projections(model)
        self.mask: torch.Tensor | None = None
        self._handles = [p.register_forward_pre_hook(self._make_hook(i)) for i, p in enumerate(self.projections)]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_layers, self.num_heads)

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            mask = self.mask
            if mask is None:
                return None
            x = args[0]
            if mask.dim() == 3 and mask.shape[0] != x.shape[0]:
                # a mismatched per-example mask must not broadcast silently over the batch
                raise ValueError(f"per-example head mask has {mask.shape[0]} rows for a batch of {x.shape[0]}")
            gate = mask[..., layer, :].to(x.dtype)  # (H,) or (B, H)
            gate = gate.reshape(-1, *([1] * (x.dim() - 2)), self.num_heads, 1)
            gated = (x.unflatten(-1, (self.num_heads, self.head_dim)) * gate).flatten(-2)
            return (gated, *args[1:])

        return hook

    def check(self, mask: torch.Tensor, batch_size: int | None = None) -> None:
        if mask.shape[-2:] != self.shape or mask.dim() not in (2, 3):
            raise ValueError(
                f"head mask has shape {tuple(mask.shape)}; this model needs {self.shape} "
                f"(layers x heads) or (batch, {self.num_layers}, {self.num_heads})"
            )
        if mask.dim() == 3 and batch_size is not None and mask.shape[0] != batch_size:
            raise ValueError(f"per-example head mask has {mask.shape[0]} rows for a batch of {batch_size}")

    @contextmanager
    def applied(self, mask: torch.Tensor | None, batch_size: int | None = None):
        if mask is not None:
            self.check(mask, batch_size)
        previous, self.mask = self.mask, mask
        try:
            yield
        finally:
            self.mask = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def head_parameters(model: nn.Module) -> list[dict[str, tuple[nn.Parameter, int]]]:
    """Per layer, the parameters split between heads: name -> (parameter, the dim split by head).

    A head owns its rows of the query, key and value weights and biases and its columns of
    the attention output projection; everything else is shared between heads.
    """
    layers = []
    for attn, out in zip(attention_self_modules(model), attention_output_projections(model)):
        entries = {}
        for name in ("query", "key", "value"):
            lin = getattr(attn, name)
            entries[f"{name}.weight"] = (lin.weight, 0)
            if lin.bias is not None:
                entries[f"{name}.bias"] = (lin.bias, 0)
        entries["output.weight"] = (out.weight, 1)
        layers.append(entries)
    return layers


def disabled_parameter_masks(model: nn.Module, head_mask: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """For an L×H 0/1 mask: parameter -> boolean tensor, True on the elements of disabled heads."""
    num_layers, num_heads = head_mask.shape
    out: dict[nn.Parameter, torch.Tensor] = {}
    for layer, entries in enumerate(head_parameters(model)):
        for param, dim in entries.values():
            head_dim = param.shape[dim] // num_heads
            off = (head_mask[layer] == 0).to(param.device).repeat_interleave(head_dim)
            shape = [1] * param.dim()
            shape[dim] = -1
            out[param] = off.reshape(shape).expand_as(param)
    return out
