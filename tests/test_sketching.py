"""The sketch engine against exact references: explicit per-example gradients from one-example
backward passes (projected with an explicit Kronecker product), Monte-Carlo unbiasedness,
batch-size invariance and matrices that depend on names and seed only.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, cli_env, make_tiny_model, random_batch

from callbacks.sketching import (
    SketchOptions,
    capture_gradients,
    get_sketcher,
    projection_matrices,
    resolve_precision,
    select_layers,
    sketch_batch,
    sketch_dim,
)
from lightning_modules.gates import HeadGates

LAYERS, HEADS, HIDDEN, VOCAB = 2, 4, 16, 100


def tiny_float64(seed: int = 0, attn: str = "eager", layout: str = "xlmr"):
    # init_std 0.2: gradients far from zero, so relative errors mean something
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, VOCAB, attn=attn, seed=seed, num_labels=3, init_std=0.2,
                            layout=layout)
    return model.double()


def inputs(batch: int = 4, length: int = 10, seed: int = 0):
    ids, att = random_batch(batch, length, VOCAB, seed)
    labels = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(seed + 7))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def random_head_mask(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, LAYERS, HEADS, generator=g) > 0.3).double()
    mask[:, 0, 0] = 1.0
    mask[0, 1, 2] = 0.0
    return mask


def explicit_gradients(model, batch, head_mask, layer_names):
    """Per example: each layer's [∇W, ∇b] from a backward pass over that example alone (unpadded)."""
    gates = HeadGates(model)
    modules = dict(model.named_modules())
    out = []
    try:
        for b in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b : b + 1, :n]
            model.zero_grad()
            mask = None if head_mask is None else head_mask[b]
            with gates.applied(mask):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            F.cross_entropy(logits, batch["labels"][b : b + 1], reduction="sum").backward()
            per_layer = []
            for name in layer_names:
                lin = modules[name]
                per_layer.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], dim=1).clone())
            out.append(per_layer)
    finally:
        gates.remove()
    return out


def kron_projection(model, names, options):
    """Per layer: the explicit (k², out·(in+1)) matrix Σ_j kron(G1_j, G2_j)."""
    modules = dict(model.named_modules())
    mats = []
    for name in names:
        lin = modules[name]
        g1, g2 = projection_matrices(name, lin.out_features, lin.in_features, True, options)
        k = options.k
        full = sum(np.kron(g1[j * k : (j + 1) * k], g2[j * k : (j + 1) * k]) for j in range(options.pairs))
        mats.append(torch.as_tensor(full))
    return mats


@pytest.mark.parametrize("pairs,attention,layout", [(1, "eager", "xlmr"), (3, "eager", "xlmr"), (2, "sdpa", "xlmr"),
                                                    (1, "eager", "bert"), (2, "sdpa", "bert")])
def test_sketch_equals_kronecker_projection_of_explicit_gradient(pairs, attention, layout):
    model = tiny_float64(seed=1, layout=layout)
    batch = inputs(batch=4, length=10, seed=2)
    head_mask = random_head_mask(4, seed=3)
    gates = HeadGates(model)
    concat = SketchOptions(k=5, pairs=pairs, combine="concat", seed=11, attention=attention)
    summed = SketchOptions(k=5, pairs=pairs, combine="sum", seed=11, attention=attention)
    s_concat, loss, pred = sketch_batch(model, gates, batch, head_mask, concat)
    s_sum, loss2, _ = sketch_batch(model, gates, batch, head_mask, summed)
    gates.remove()
    names = get_sketcher(model, concat).names
    assert len(names) == LAYERS * 6 + 2
    grads = explicit_gradients(model, batch, head_mask, names)
    mats = kron_projection(model, names, concat)
    assert s_concat.shape == (4, len(names) * 25) and s_sum.shape == (4, 25)
    for b in range(4):
        expected = [m @ g.reshape(-1) for m, g in zip(mats, grads[b])]
        assert max(float(e.abs().max()) for e in expected) > 1e-3  # non-trivial gradients
        torch.testing.assert_close(s_concat[b], torch.cat(expected), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s_sum[b], sum(expected), rtol=1e-9, atol=1e-12)
    # loss and prediction are the per-example (unreduced) ones
    with torch.no_grad():
        ref_losses = []
        gates = HeadGates(model)
        for b in range(4):
            n = int(batch["attention_mask"][b].sum())
            with gates.applied(head_mask[b]):
                logits = model(input_ids=batch["input_ids"][b : b + 1, :n]).logits
            ref_losses.append(F.cross_entropy(logits, batch["labels"][b : b + 1]))
            assert int(pred[b]) == int(logits.argmax())
        gates.remove()
    torch.testing.assert_close(loss, torch.stack(ref_losses), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize("layout", ["xlmr", "bert"])
def test_exact_mode_equals_explicit_per_example_gradients(layout):
    model = tiny_float64(seed=4, layout=layout)
    batch = inputs(batch=3, length=9, seed=5)
    head_mask = random_head_mask(3, seed=6)
    gates = HeadGates(model)
    options = SketchOptions(kind="exact")
    exact, _, _ = sketch_batch(model, gates, batch, head_mask, options)
    gates.remove()
    sketcher = get_sketcher(model, options)
    assert exact.shape == (3, sketch_dim(sketcher.layers, options))
    modules = dict(model.named_modules())
    grads = explicit_gradients(model, batch, head_mask, sketcher.names)
    for b in range(3):
        # parameter order: weight (row-major) then bias, layer by layer
        expected = torch.cat(
            [torch.cat([g[:, :-1].reshape(-1), g[:, -1]]) for g, name in zip(grads[b], sketcher.names)]
        )
        assert expected.numel() == sum(
            modules[n].weight.numel() + modules[n].bias.numel() for n in sketcher.names
        )
        torch.testing.assert_close(exact[b], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layout", ["xlmr", "bert"])
def test_exact_dot_products_layer_by_layer_equal_those_of_the_whole_gradient(layout):
    # the fidelity stage scores a training example's exact gradient one layer at a time, never holding it
    model = tiny_float64(seed=11, layout=layout)
    batch = inputs(batch=4, length=10, seed=12)
    batch["attention_mask"][1, 7:] = 0  # padding: contributes nothing either way
    head_mask = random_head_mask(4, seed=13)
    gates = HeadGates(model)
    sketcher = get_sketcher(model, SketchOptions(kind="exact"))
    whole, _, _ = sketcher(model, gates, batch, head_mask)
    against = torch.randn(3, sketcher.dim, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    dots, squares = sketcher.dot_exact(model, gates, batch, head_mask, against)
    torch.testing.assert_close(dots, whole @ against.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(squares, (whole * whole).sum(1), rtol=1e-9, atol=1e-12)
    # out=: the values land in the caller's rows, equal to the returned ones
    rows = torch.zeros((6, sketcher.dim), dtype=torch.float64)
    sketcher(model, gates, batch, head_mask, out=rows[1:5])
    assert torch.equal(rows[1:5], whole) and not rows[0].any() and not rows[5].any()
    with pytest.raises(ValueError, match="out= takes a"):
        sketcher(model, gates, batch, head_mask, out=rows[:3])
    gates.remove()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padding_and_batch_composition_do_not_change_a_sketch(attention):
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, VOCAB, attn="sdpa", seed=7, num_labels=3, init_std=0.2)
    gates = HeadGates(model)
    options = SketchOptions(k=6, seed=3, attention=attention, precision="32")  # bf16 rounds per batch shape
    batch = inputs(batch=6, length=14, seed=8)
    head_mask = random_head_mask(6, seed=9).float()
    full, loss, pred = sketch_batch(model, gates, batch, head_mask, options)
    assert model.config._attn_implementation == "sdpa" and all(p.requires_grad for p in model.parameters())
    for size in (1, 2, 4):
        for start in range(0, 6, size):
            rows = slice(start, start + size)
            part = {k: v[rows] for k, v in batch.items()}
            width = int(part["attention_mask"].sum(1).max())
            part = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in part.items()}  # less padding
            s, part_loss, p = sketch_batch(model, gates, part, head_mask[rows], options)
            torch.testing.assert_close(s, full[rows], rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(part_loss, loss[rows], rtol=1e-5, atol=1e-6)
            assert torch.equal(p, pred[rows])
    gates.remove()


def test_matrices_depend_only_on_name_side_and_seed_across_processes():
    options = SketchOptions(k=4, pairs=2, seed=5)
    g1, g2 = projection_matrices("roberta.encoder.layer.0.attention.self.query", 8, 6, True, options)
    assert g1.shape == (8, 8) and g2.shape == (8, 7)
    again = projection_matrices("roberta.encoder.layer.0.attention.self.query", 8, 6, True, options)
    assert np.array_equal(g1, again[0]) and np.array_equal(g2, again[1])
    other_seed = projection_matrices(
        "roberta.encoder.layer.0.attention.self.query", 8, 6, True, SketchOptions(k=4, pairs=2, seed=6)
    )
    other_name = projection_matrices("roberta.encoder.layer.1.attention.self.query", 8, 6, True, options)
    assert not np.allclose(g1, other_seed[0]) and not np.allclose(g1, other_name[0])
    assert not np.allclose(g1[:, :6], g2[:, :6])  # the two sides are independent
    digest = hashlib.sha256(g1.tobytes() + g2.tobytes()).hexdigest()
    code = (
        "import hashlib; from callbacks.sketching import SketchOptions, projection_matrices; "
        "g1, g2 = projection_matrices('roberta.encoder.layer.0.attention.self.query', 8, 6, True, "
        "SketchOptions(k=4, pairs=2, seed=5)); print(hashlib.sha256(g1.tobytes() + g2.tobytes()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest


def test_sketch_inner_product_is_unbiased_for_every_layer_shape():
    """E over seeds of ⟨S a, S b⟩ equals ⟨a, b⟩, per layer (shapes 16×17, 32×17, 16×33, 3×17, and three
    pairs), and for the summed sketch of two real per-example gradients."""
    rng = np.random.default_rng(0)
    shapes = {
        "square": (16, 16, 1),
        "wide": (32, 16, 1),
        "tall": (16, 32, 1),
        "head": (3, 16, 1),
        "pairs": (16, 16, 3),
    }
    seeds = range(300)
    for name, (out_f, in_f, pairs) in shapes.items():
        # gradients are sums of token outer products: low-rank-ish, correlated pair
        a = sum(np.outer(rng.standard_normal(out_f), rng.standard_normal(in_f + 1)) for _ in range(6))
        b = a + 0.7 * sum(
            np.outer(rng.standard_normal(out_f), rng.standard_normal(in_f + 1)) for _ in range(6)
        )
        exact = float((a * b).sum())
        ratios, norms = [], []
        for seed in seeds:
            g1, g2 = projection_matrices(name, out_f, in_f, True, SketchOptions(k=4, pairs=pairs, seed=seed))
            # the engine's per-layer sketch: Σ_j G1_j M G2_jᵀ
            sa = sum(g1[4 * j : 4 * j + 4] @ a @ g2[4 * j : 4 * j + 4].T for j in range(pairs))
            sb = sum(g1[4 * j : 4 * j + 4] @ b @ g2[4 * j : 4 * j + 4].T for j in range(pairs))
            ratios.append(float((sa * sb).sum()) / exact)
            norms.append(float((sa * sa).sum()) / float((a * a).sum()))
        for values in (ratios, norms):
            mean, se = np.mean(values), np.std(values) / np.sqrt(len(values))
            assert abs(mean - 1) < 4 * se and se < 0.08, (name, mean, se)
    # whole model, summed over layers: cross-layer terms vanish in expectation
    model = tiny_float64(seed=12)
    batch = inputs(batch=2, length=8, seed=13)
    exact_g, _, _ = sketch_batch(model, None, batch, None, SketchOptions(kind="exact"))
    target = float(exact_g[0] @ exact_g[1])
    estimates = []
    for seed in range(200):
        s, _, _ = sketch_batch(model, None, batch, None, SketchOptions(k=4, seed=seed))
        estimates.append(float(s[0] @ s[1]) / target)
    mean, se = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - 1) < 4 * se and se < 0.1, (mean, se)


@pytest.mark.parametrize("layout", ["xlmr", "bert"])
def test_default_layers_are_every_linear_layer_of_encoder_and_head(layout):
    model = tiny_float64(layout=layout)
    every_linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = {n for n, _ in select_layers(model)}
    assert chosen == every_linear
    head = {"bert": {"bert.pooler.dense", "classifier"}, "xlmr": {"classifier.dense", "classifier.out_proj"}}[layout]
    assert head <= chosen and len(chosen) == LAYERS * 6 + 2


def test_layer_selection_by_pattern_and_clear_error():
    model = tiny_float64()
    names = [n for n, _ in select_layers(model, [r"classifier\.", r"layer\.1\.output\.dense$"])]
    assert names == [
        "classifier.dense",
        "classifier.out_proj",
        "roberta.encoder.layer.1.output.dense",
    ] or sorted(names) == sorted(
        ["classifier.dense", "classifier.out_proj", "roberta.encoder.layer.1.output.dense"]
    )
    with pytest.raises(ValueError, match="match no nn.Linear"):
        select_layers(model, ["decoder"])
    # only the classifier sketched: its sketch equals the explicit projection of its gradient alone
    batch = inputs(batch=3, length=7, seed=14)
    options = SketchOptions(k=3, combine="concat", layers=[r"^classifier\."])
    s, _, _ = sketch_batch(model, None, batch, None, options)
    layer_names = get_sketcher(model, options).names
    grads = explicit_gradients(model, batch, None, layer_names)
    mats = kron_projection(model, layer_names, options)
    for b in range(3):
        torch.testing.assert_close(
            s[b], torch.cat([m @ g.reshape(-1) for m, g in zip(mats, grads[b])]), rtol=1e-9, atol=1e-12
        )


def test_projecting_a_kept_capture_equals_the_streamed_sketch():
    """``Sketcher.project(capture_gradients(...))`` (the fidelity benchmark's path) = ``sketch_batch``."""
    model = tiny_float64(seed=15)
    batch = inputs(batch=3, length=9, seed=16)
    head_mask = random_head_mask(3, seed=17)
    gates = HeadGates(model)
    for options in (SketchOptions(k=3, pairs=2, combine="concat", seed=1), SketchOptions(kind="exact")):
        sketcher = get_sketcher(model, options)
        streamed, loss, _ = sketch_batch(model, gates, batch, head_mask, options)
        captured = capture_gradients(model, gates, batch, head_mask, sketcher.layers)
        assert captured.token_mask is not None  # the batch is padded
        torch.testing.assert_close(sketcher.project(captured), streamed, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(captured.losses, loss)
    gates.remove()


def test_bfloat16_sketches_equal_float32_ones_up_to_rounding():
    """The bf16 pass (autocast forward/backward, float32 accumulation) estimates the same projection."""
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, VOCAB, attn="eager", seed=12, num_labels=3, init_std=0.2)
    gates = HeadGates(model)
    batch = inputs(batch=6, length=14, seed=13)
    head_mask = random_head_mask(6, seed=14).float()
    ref, ref_loss, _ = sketch_batch(model, gates, batch, head_mask, SketchOptions(k=8, seed=2, precision="32"))
    low, loss, _ = sketch_batch(model, gates, batch, head_mask, SketchOptions(k=8, seed=2, precision="bf16"))
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert not torch.equal(low, ref)  # it did run in bfloat16
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1)
    assert cos.min() > 0.999, cos
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-3)
    exact = SketchOptions(kind="exact", precision="bf16")  # exact gradients stay float32 whatever is asked
    e1, _, _ = sketch_batch(model, gates, batch, head_mask, exact)
    e2, _, _ = sketch_batch(model, gates, batch, head_mask, SketchOptions(kind="exact", precision="32"))
    assert torch.equal(e1, e2)
    gates.remove()
    assert resolve_precision("auto", "cpu") in ("32", "bf16") and resolve_precision("32", "cuda") == "32"
    with pytest.raises(ValueError, match="precision must be"):
        SketchOptions(precision="fp8")
