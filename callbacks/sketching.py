"""Per-example loss-gradient sketches (TracIn's random projections) that never materialise a
per-example gradient.

For an ``nn.Linear`` ``y = W x + b`` applied to the tokens ``t`` of one example, the loss gradient
of ``W̃ = [W b]`` is ``Σ_t ∇y_t x̃_tᵀ`` with ``x̃ = [x; 1]`` (the constant 1 carries the bias). Its
Kronecker projection ``G1 ∇W̃ G2ᵀ = Σ_t (G1 ∇y_t)(G2 x̃_t)ᵀ`` needs only two thin matmuls per
token (k columns each) and a k×k outer-product sum per example, instead of an out×in matrix per
example. A forward hook projects ``x`` as the layer runs; a tensor hook on the layer's output
folds ``∇y`` in as soon as one backward pass of the summed (unreduced) per-example losses
produces it. Every parameter is frozen meanwhile, so no weight gradient is ever computed, and the
graph starts at the lowest sketched layer. In eval mode (no dropout) the examples of a batch do
not interact, so that one backward pass yields every example's own gradient.

The projection of layer ``l`` is ``S_l = (1/√r) Σ_j G1_lj ⊗ G2_lj`` (``r`` = ``pairs``), entries
N(0, 1/k), so ``E[S_lᵀ S_l] = I`` and ``⟨S_l a, S_l b⟩`` is an unbiased estimate of ``⟨a, b⟩``
whatever the layer's shape. Summing the layers' sketches (``combine="sum"``) with independent
matrices is again an unbiased projection of the whole concatenated gradient (the cross-layer terms
have mean zero), so one d = k² vector per example holds every layer. Matrices are drawn from a
seed derived from (layer name, side, pair, seed), so train and test sketches and every checkpoint
use the same ones in any process, and they are never larger than k·r × (in + 1).
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.layout import REPRESENTATIONS
from analysis.masks import name_seed
from lightning_modules.precision import bf16_cost_warning, native_bf16_on

# Identifies how the random matrices are drawn; recorded in every sidecar.
GENERATOR = "numpy-pcg64-standard_normal-float64"
# every linear layer of the encoder and of the classification head: XLM-R's head is
# ``classifier.dense`` + ``classifier.out_proj``; BERT's is ``bert.pooler.dense`` + ``classifier``
DEFAULT_LAYER_PATTERNS = (r"(^|\.)encoder\.", r"(^|\.)pooler\.", r"(^|\.)classifier(\.|$)")


@dataclass
class SketchOptions:
    """How per-example gradients are projected.

    The default (k=64, four pairs, summed: d=4096, bfloat16 where native) is the cheapest setting whose
    recall of the exact cosine-TracIn top sets reached 0.9 (positive and negative) with a margin on a
    model that has learned its task: the e5-small demo run, a pool of 750 training × 60 test examples,
    top 5 % (38) of the pool, against exact per-example gradients of all 74 linear layers
    (``benchmarks/sketch_fidelity.py``: 0.919 / 0.935; one pair 0.892 / 0.918, the paper's k=16
    0.718 / 0.761; k=128, one pair, 0.930 / 0.946 at four times d). Four pairs keep d, the files
    and the ranking cost of one pair and cost about 20 % more sketching time; bfloat16 changes no
    recall by more than 0.008 and sketches e5-small 2.1 × faster than one float32 pair on AVX-512 cores.

    Args:
        kind: ``kronecker`` (random projection) or ``exact`` (the flattened per-example gradient of
            the selected layers itself, weight then bias per layer; small models only, to measure fidelity),
            or ``representation``: no gradient, the sentence representation the classification head reads
            (the final layer's first-token state: the input of ``pooler.dense`` or ``classifier.dense``), for
            the representation-similarity baseline (``influence.method: repsim``); written under
            ``<run>/representations/`` (``representation_root``).
        k: rows of each side's Gaussian matrix; a layer's sketch is k×k (d = k² when summed).
        pairs: independent Kronecker pairs summed per layer (scaled 1/√pairs): same d, lower variance.
        combine: ``sum`` (layers' sketches added: d = k²) or ``concat`` (side by side: d = layers·k²).
        seed: projection seed; each matrix is seeded from (layer name, side, pair, seed).
        layers: regular expressions searched in module names (e.g. ``roberta.encoder.layer.3.``); an
            ``nn.Linear`` is sketched when any matches. None: every linear layer of the encoder and the
            classification head.
        attention: attention kernel while sketching: ``eager`` (plain math, the reference) or ``sdpa``
            (PyTorch's fused kernel: the same per-example gradients up to float rounding on CPU, where it
            is faster; the values do not depend on this choice beyond rounding).
        precision: the model's matmuls while sketching: ``32`` (float32 throughout), ``bf16`` (the
            forward and backward under bfloat16 autocast, projections accumulated in float32) or
            ``auto`` (bf16 where the device multiplies bfloat16 natively: CUDA of compute capability 8+,
            CPUs with AVX-512 BF16 or AMX; else 32; the Trainer's ``precision: auto`` decides alike). On 2 AVX-512 cores bf16 sketches e5-small about 2.7 x faster with
            sketches at cosine > 0.9999 to float32 ones and the same recall of exact top sets
            (docs/measurements.md, "Which projection").
            ``exact`` gradients are always float32.
    """

    kind: Literal["kronecker", "exact", "representation"] = "kronecker"
    k: int = 64
    pairs: int = 4
    combine: Literal["sum", "concat"] = "sum"
    seed: int = 0
    layers: list[str] | None = None
    attention: Literal["eager", "sdpa"] = "eager"
    precision: Literal["auto", "32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("kronecker", "exact", "representation"):
            raise ValueError(f"sketch kind must be 'kronecker', 'exact' or 'representation', found {self.kind!r}")
        if self.combine not in ("sum", "concat"):
            raise ValueError(f"sketch combine must be 'sum' or 'concat', found {self.combine!r}")
        if self.attention not in ("eager", "sdpa"):
            raise ValueError(f"sketch attention must be 'eager' or 'sdpa', found {self.attention!r}")
        if self.precision not in ("auto", "32", "bf16"):
            raise ValueError(f"sketch precision must be 'auto', '32' or 'bf16', found {self.precision!r}")
        if self.k < 1 or self.pairs < 1:
            raise ValueError(f"sketch k and pairs must be >= 1, found k={self.k}, pairs={self.pairs}")

    def projection_record(self) -> dict:
        """The sidecar's ``projection`` entry: everything that fixes the sketch's values."""
        if self.kind == "representation":
            return {"kind": "representation", "k": None, "seed": self.seed, "combine": None, "pairs": None,
                    "generator": None, "bias": None}
        if self.kind == "exact":
            return {
                "kind": "exact",
                "k": None,
                "seed": self.seed,
                "combine": "concat",
                "pairs": None,
                "generator": None,
                "bias": "last column",
            }
        return {
            "kind": "kronecker",
            "k": self.k,
            "seed": self.seed,
            "combine": self.combine,
            "pairs": self.pairs,
            "generator": GENERATOR,
            "bias": "x extended with a constant 1",
        }


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``32`` or ``bf16``: what ``auto`` means on this device (see ``SketchOptions.precision``), decided
    as the Trainer's ``precision: auto`` is (``lightning_modules/precision.py``). ``bf16`` asked for where
    bfloat16 is emulated stays, with a warning naming the cost."""
    device_type = torch.device(device).type
    native, reason = native_bf16_on(device_type)
    if precision == "auto":
        return "bf16" if native else "32"
    if precision == "bf16" and not native:
        _warn_emulated(device_type, reason)
    return precision


@functools.cache  # once per process and device type, not once per batch
def _warn_emulated(device_type: str, reason: str) -> None:
    warnings.warn(bf16_cost_warning("sketch precision bf16", reason), stacklevel=3)


def autocast_for(precision: str, device: torch.device | str):
    """The autocast context a sketch pass of this precision runs under."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# -- layers and matrices ------------------------------------------------------------------------
def select_layers(model: nn.Module, patterns: list[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules to sketch, in module order, as (name, module)."""
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    regexes = [re.compile(p) for p in (patterns if patterns is not None else DEFAULT_LAYER_PATTERNS)]
    chosen = [(name, mod) for name, mod in linears if any(r.search(name) for r in regexes)]
    if not chosen:
        names = ", ".join(name for name, _ in linears[:8])
        raise ValueError(
            f"sketch layers {patterns!r} match no nn.Linear of the model; its linear layers are named like: {names}"
        )
    return chosen


def layer_parameter_count(layer: nn.Linear) -> int:
    return layer.out_features * layer.in_features + (layer.out_features if layer.bias is not None else 0)


# the head layer whose input is the sentence representation: BERT's pooler, XLM-R's classification head
HEAD_INPUT_LAYERS = (r"(^|\.)pooler\.dense$", r"(^|\.)classifier\.dense$")


def representation_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, layer) whose input is the sentence representation the classifier reads."""
    for pattern in HEAD_INPUT_LAYERS:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and re.search(pattern, name):
                return name, mod
    raise ValueError("sketch kind 'representation': the model has no pooler.dense or classifier.dense layer "
                     "whose input is the sentence representation")


def representation_root(run_dir, options: SketchOptions):
    """Where a sketch pass of these options writes: representations go to ``<run>/representations`` (laid out
    as a run's ``sketches/``), gradient sketches to the run itself."""
    return Path(run_dir) / REPRESENTATIONS if options.kind == "representation" else Path(run_dir)


def sketch_dim(layers: list[tuple[str, nn.Linear]], options: SketchOptions) -> int:
    """d: the length of one example's sketch."""
    if options.kind == "representation":
        return layers[0][1].in_features
    if options.kind == "exact":
        return sum(layer_parameter_count(mod) for _, mod in layers)
    per_layer = options.k * options.k
    return per_layer if options.combine == "sum" else per_layer * len(layers)


def gaussian(name: str, side: str, pair: int, seed: int, rows: int, cols: int) -> np.ndarray:
    """Standard normal (rows, cols) float64 drawn from a seed derived from names only."""
    rng = np.random.default_rng(name_seed("sketch", name, side, pair, seed))
    return rng.standard_normal((rows, cols))


def projection_matrices(name: str, out_features: int, in_features: int, bias: bool, options: SketchOptions):
    """(G1, G2) of one layer, float64 numpy: G1 (pairs·k, out), G2 (pairs·k, in [+1 for the bias]).

    Pair ``j`` is rows ``j·k:(j+1)·k``. Entries are N(0, 1/k) on both sides, G1 additionally scaled
    by 1/√pairs, so that the summed Kronecker product S satisfies E[SᵀS] = I.
    """
    k, r = options.k, options.pairs
    cols2 = in_features + (1 if bias else 0)
    g1 = np.concatenate([gaussian(name, "out", j, options.seed, k, out_features) for j in range(r)])
    g2 = np.concatenate([gaussian(name, "in", j, options.seed, k, cols2) for j in range(r)])
    return g1 / np.sqrt(k * r), g2 / np.sqrt(k)


# -- the engine ------------------------------------------------------------------------------------
class _Hooks:
    """Forward hooks on the selected layers. Each call's output is made to require grad when
    nothing upstream does (parameters are frozen, so the graph starts at the lowest sketched
    layer), and ``on_call(layer index, input, output)`` sees every call."""

    def __init__(self, layers: list[tuple[str, nn.Linear]], on_call):
        self.index = {id(mod): i for i, (_, mod) in enumerate(layers)}
        self.on_call = on_call
        self.roots: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._layers = layers

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            output.requires_grad_()
            self.roots.append(output)
        self.outputs.append(output)
        self.on_call(self.index[id(module)], args[0], output)

    @contextmanager
    def installed(self):
        handles = [mod.register_forward_hook(self.hook) for _, mod in self._layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _forward_losses(model, gates, batch: dict, head_mask, hooks: _Hooks):
    """Logits and per-example (unreduced) cross-entropy of one batch, with the hooks installed."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if head_mask is not None and gates is None:
        raise ValueError("a head mask needs the model's HeadGates (gates=None cannot apply it)")
    with hooks.installed():
        gating = gates.applied(head_mask, input_ids.shape[0]) if gates is not None else nullcontext()
        with gating:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits, F.cross_entropy(logits, batch["labels"], reduction="none")


def _token_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    # padded tokens get exactly zero gradient through the attention mask; the explicit mask is a guard
    return None if bool(attention_mask.all()) else attention_mask.to(dtype)


@dataclass
class Captured:
    """One batch's forward/backward kept whole: per call of a selected layer (layer index, input x),
    its output gradient ∇y, the token mask, the per-example losses and the logits. For comparing
    several projections of the same gradients (``Sketcher.project``); ``sketch_batch`` streams instead."""

    layers: list[tuple[str, nn.Linear]]
    records: list[tuple[int, torch.Tensor]]
    grads: list[torch.Tensor | None]
    token_mask: torch.Tensor | None
    losses: torch.Tensor
    logits: torch.Tensor


def capture_gradients(
    model: nn.Module,
    gates,
    batch: dict,
    head_mask: torch.Tensor | None,
    layers: list[tuple[str, nn.Linear]],
    attention: str = "eager",
    precision: str = "32",
) -> Captured:
    """Forward the batch with hooks on ``layers``, then one backward of the summed per-example
    losses to the layers' outputs (parameters frozen: no weight gradient is computed)."""
    records: list[tuple[int, torch.Tensor]] = []
    hooks = _Hooks(layers, lambda i, x, y: records.append((i, x)))
    device = batch["input_ids"].device
    with sketching_mode(model, attention), torch.enable_grad(), autocast_for(precision, device):
        logits, losses = _forward_losses(model, gates, batch, head_mask, hooks)
        grads = torch.autograd.grad(losses.sum(), hooks.outputs, allow_unused=True)
    token_mask = _token_mask(batch["attention_mask"], logits.dtype)
    return Captured(layers, records, list(grads), token_mask, losses.detach(), logits.detach())


@contextmanager
def sketching_mode(model: nn.Module, attention: str = "eager"):
    """Eval mode (no dropout), the given attention kernel (eager by default: exact, batch-invariant
    per-example gradients) and frozen parameters (no weight gradients) for the duration;
    re-entrant; restores everything."""
    from lightning_modules.backbones import set_attention_implementation

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = current is not None and current != attention
    if getattr(model, "_crossling_sketching", False):
        if switch:
            set_attention_implementation(model, attention)
        try:
            yield
        finally:
            if switch:
                set_attention_implementation(model, current)
        return
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    if switch:
        set_attention_implementation(model, attention)
    for p in params:
        p.requires_grad_(False)
    model._crossling_sketching = True
    try:
        yield
    finally:
        model._crossling_sketching = False
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        if switch:
            set_attention_implementation(model, current)
        model.train(was_training)


class Sketcher:
    """Sketches batches of one model with fixed options; holds the layers and their matrices."""

    def __init__(self, model: nn.Module, options: SketchOptions,
                 scales: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        """``scales``: per layer name (out scale (out,), input scale (in + 1,)): sketch ``a bᵀ ⊙ [∇W ∇b]``
        instead of the gradient, by scaling the projection matrices (``callbacks/preconditioner.py``:
        Adam's factored preconditioner). Kronecker kind only."""
        self.options = options
        if scales is not None and options.kind != "kronecker":
            raise ValueError("scaled sketches need kind 'kronecker'")
        self.scales = scales
        self.layers = [representation_layer(model)] if options.kind == "representation" \
            else select_layers(model, options.layers)
        self.names = [name for name, _ in self.layers]
        self.dim = sketch_dim(self.layers, options)
        self._matrices: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._offsets = np.cumsum([0] + [layer_parameter_count(mod) for _, mod in self.layers]).tolist()

    def matrices(self, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (G1ᵀ (out, r·k), G2ᵀ (in + 1, r·k)) on device; the last row of G2ᵀ multiplies the
        constant 1 (zeros for a layer without bias)."""
        key = (str(device), dtype)
        if key not in self._matrices:
            mats = []
            for name, mod in self.layers:
                bias = mod.bias is not None
                g1, g2 = projection_matrices(name, mod.out_features, mod.in_features, bias, self.options)
                if not bias:
                    g2 = np.concatenate([g2, np.zeros((g2.shape[0], 1))], axis=1)
                if self.scales is not None:  # G1 diag(a) and G2 diag(b) project a bᵀ ⊙ ∇[W b]
                    a, b = self.scales[name]
                    if a.shape != (g1.shape[1],) or b.shape != (g2.shape[1],):
                        raise ValueError(f"scales of layer {name}: expected ({g1.shape[1]},) and "
                                         f"({g2.shape[1]},), found {a.shape} and {b.shape}")
                    g1, g2 = g1 * a[None, :], g2 * b[None, :]
                mats.append(
                    (
                        torch.as_tensor(g1.T.copy(), dtype=dtype, device=device),
                        torch.as_tensor(g2.T.copy(), dtype=dtype, device=device),
                    )
                )
            self._matrices[key] = mats
        return self._matrices[key]

    def __call__(self, model: nn.Module, gates, batch: dict, head_mask: torch.Tensor | None = None,
                 out: torch.Tensor | None = None):
        """(sketches (B, d), per-example loss (B,), argmax prediction (B,)) of one batch.

        Streams: a forward hook projects each layer's input as the layer runs, a tensor hook folds
        the output gradient into the sketches as soon as the backward pass produces it, so neither
        inputs nor output gradients outlive their use (less memory, and freed buffers are reused).
        ``out``, a zeroed (B, d) tensor (exact kind only), receives the values in place: a caller that
        holds many exact gradients fills its own rows without a second copy of the batch's.
        """
        ids = batch["input_ids"]
        if self.options.kind == "representation":
            return self._representations(model, gates, batch, head_mask)
        if out is not None:
            if self.options.kind != "exact" or out.shape != (ids.shape[0], self.dim):
                raise ValueError(f"out= takes a ({ids.shape[0]}, {self.dim}) tensor for exact gradients")
        target: list[torch.Tensor] = [] if out is None else [out]
        token_mask: list[torch.Tensor | None] = []

        def on_call(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if not target:
                target.append(self._empty(ids.shape[0], x.device, torch.promote_types(x.dtype, torch.float32)))
            if not token_mask:
                token_mask.append(_token_mask(batch["attention_mask"], x.dtype))
            held = [self._input_state(i, x.detach())]  # dropped as soon as the gradient is folded in
            y.register_hook(lambda g: self._fold(i, held.pop(), g, token_mask[0], target[0]))

        losses, logits = self._backward(model, gates, batch, head_mask, on_call, self.options.kind != "exact")
        return target[0].reshape(ids.shape[0], -1), losses, logits.argmax(-1)

    def dot_exact(self, model: nn.Module, gates, batch: dict, head_mask: torch.Tensor | None,
                  against: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨g_b, a⟩ for every example b of the batch and row a of ``against`` (B, n), ‖g_b‖² (B,)) from
        the exact per-example gradients g_b (exact kind only), float64.

        The gradient is formed one layer at a time and scored against that layer's columns of
        ``against`` (n, d) as soon as the backward pass reaches it, so memory holds one layer's (B, out·in),
        never the batch's (B, d): equal to ``against @ self(batch)[0].T`` up to float rounding.
        """
        if self.options.kind != "exact" or against.shape[1] != self.dim:
            raise ValueError(f"dot_exact scores exact gradients against (n, {self.dim}) rows")
        b = batch["input_ids"].shape[0]
        dots = torch.zeros((b, against.shape[0]), dtype=torch.float64)
        squares = torch.zeros(b, dtype=torch.float64)
        calls: list[int] = []
        token_mask: list[torch.Tensor | None] = []

        def score(i: int, state: torch.Tensor, g: torch.Tensor) -> None:
            piece = torch.zeros((b, self._offsets[i + 1] - self._offsets[i]), device=g.device,
                                dtype=torch.promote_types(g.dtype, torch.float32))
            self._fold(i, state, g, token_mask[0], piece, start=0)
            with torch.no_grad():
                part = against[:, self._offsets[i] : self._offsets[i + 1]]
                dots.add_((piece @ part.to(piece.dtype).T).double().cpu())
                squares.add_(torch.linalg.vector_norm(piece, dim=1, dtype=torch.float64).square().cpu())

        def on_call(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if i in calls:  # a layer's gradient is the sum over its calls: its square is not the sum of theirs
                raise ValueError(f"layer {self.names[i]} runs more than once per forward pass: dot_exact cannot "
                                 "score it layer by layer")
            calls.append(i)
            if not token_mask:
                token_mask.append(_token_mask(batch["attention_mask"], x.dtype))
            held = [x.detach()[:, None] if x.dim() == 2 else x.detach()]
            y.register_hook(lambda g: score(i, held.pop(), g))

        self._backward(model, gates, batch, head_mask, on_call, False)
        return dots, squares

    def _representations(self, model, gates, batch: dict, head_mask):
        """(representations (B, hidden) float32, per-example loss, prediction): one forward pass, no gradient."""
        seen: list[torch.Tensor] = []
        layer = self.layers[0][1]
        handle = layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
        ids = batch["input_ids"]
        try:
            with sketching_mode(model, self.options.attention), torch.no_grad(), \
                    autocast_for(self.options.precision, ids.device):
                logits, losses = _forward_losses(model, gates, batch, head_mask, _Hooks([], None))
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"{self.names[0]} ran {len(seen)} times in one forward pass, expected once")
        rep = seen[0]
        return (rep[:, 0] if rep.dim() == 3 else rep).float(), losses.float(), logits.argmax(-1)

    def _backward(self, model, gates, batch: dict, head_mask, on_call, low_precision: bool):
        """One forward pass with ``on_call`` hooked on the sketched layers, then one backward pass of the
        summed per-example losses (every hook runs); returns (losses, logits), detached."""
        hooks = _Hooks(self.layers, on_call)
        precision = self.options.precision if low_precision else "32"
        ids = batch["input_ids"]
        with sketching_mode(model, self.options.attention), torch.enable_grad(), autocast_for(precision, ids.device):
            logits, losses = _forward_losses(model, gates, batch, head_mask, hooks)
            if not hooks.outputs:
                raise RuntimeError(
                    f"none of the sketched layers ran in the forward pass ({self.names[:3]} ...)"
                )
            # differentiating to the roots runs every backward node above them, hence every hook
            torch.autograd.grad(losses.sum(), hooks.roots or hooks.outputs, allow_unused=True)
        return losses.detach(), logits.detach()

    def project(self, captured: Captured) -> torch.Tensor:
        """The sketches of a kept-whole capture (several Sketchers of the same layers can project one
        capture, e.g. to compare settings); equal to what ``__call__`` streams."""
        if [name for name, _ in captured.layers] != self.names:
            raise ValueError("this capture holds other layers than the sketcher's")
        batch = captured.losses.shape[0]
        ref = captured.records[0][1]
        out = self._empty(batch, ref.device, torch.promote_types(ref.dtype, torch.float32))
        with torch.no_grad():
            for (i, x), g in zip(captured.records, captured.grads):
                if g is not None:
                    self._fold(i, self._input_state(i, x), g, captured.token_mask, out)
        return out.reshape(batch, -1)

    def _empty(self, batch: int, device, dtype) -> torch.Tensor:
        if self.options.kind == "exact":
            return torch.zeros((batch, self.dim), device=device, dtype=dtype)
        k = self.options.k
        return torch.zeros(
            (batch, len(self.layers) if self.options.combine == "concat" else 1, k, k),
            device=device,
            dtype=dtype,
        )

    def _input_state(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What the backward step needs from a layer's input: [x; 1] G2ᵀ (B, T, r·k), or x itself (exact)."""
        if x.dim() == 2:
            x = x[:, None]
        if self.options.kind == "exact":
            return x
        g2t = self.matrices(x.device, x.dtype)[i][1]
        return torch.addmm(g2t[-1], x.reshape(-1, x.shape[-1]), g2t[:-1]).view(*x.shape[:2], -1)

    def _fold(self, i: int, state: torch.Tensor, g: torch.Tensor, token_mask, out: torch.Tensor,
              start: int | None = None) -> None:
        """Add one layer call's contribution: Σ_t (G1 ∇y_t)(G2 x̃_t)ᵀ per example (or ∇W, ∇b exactly, at
        column ``start`` of ``out``: the layer's offset in the whole gradient by default)."""
        with torch.no_grad():
            if g.dim() == 2:
                g = g[:, None]
            masked = token_mask is not None and g.shape[1] == token_mask.shape[1]
            batch = g.shape[0]
            if self.options.kind == "exact":
                if masked:
                    g = g * token_mask[..., None]  # padding contributes nothing
                mod = self.layers[i][1]
                start = self._offsets[i] if start is None else start
                w_end, end = start + mod.out_features * mod.in_features, start + layer_parameter_count(mod)
                out[:, start:w_end] += torch.bmm(g.transpose(1, 2), state).reshape(batch, -1)
                if mod.bias is not None:
                    out[:, w_end:end] += g.sum(1)
                return
            k = self.options.k
            a = g @ self.matrices(g.device, g.dtype)[i][0]  # (B, T, r·k)
            if masked:
                a = a * token_mask[..., None]  # padding contributes nothing
            # pairs join the token axis of the outer-product sum
            target = out[:, i] if self.options.combine == "concat" else out[:, 0]
            a, state = a.to(out.dtype), state.to(out.dtype)  # bfloat16 passes accumulate in float32
            target.baddbmm_(a.reshape(batch, -1, k).transpose(1, 2), state.reshape(batch, -1, k))


_SKETCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_sketcher(model: nn.Module, options: SketchOptions) -> Sketcher:
    """The model's Sketcher for these options (cached, so matrices are generated once)."""
    per_model = _SKETCHERS.setdefault(model, {})
    key = tuple(tuple(v) if isinstance(v, list) else v for v in astuple(options))
    if key not in per_model:
        per_model[key] = Sketcher(model, options)
    return per_model[key]


def sketch_batch(
    model: nn.Module, gates, batch: dict, head_mask: torch.Tensor | None, options: SketchOptions
):
    """Sketch one batch: returns (sketches (B, d), unreduced CE loss (B,), prediction (B,)).

    Args:
        model: a transformers sequence classifier (``SequenceClassifier.model``).
        gates: its ``HeadGates`` (or None when no head mask is used).
        batch: dict with ``input_ids``, ``attention_mask``, ``labels`` (as the datamodules collate).
        head_mask: None, an L×H mask, or a per-example B×L×H mask (mixed-language batches in one pass).
        options: the projection.
    """
    return get_sketcher(model, options)(model, gates, batch, head_mask)
