"""Head gates against exact references: the ungated model, zeroed output-projection columns,
one example at a time, and finite differences.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import LAYOUTS, make_tiny_model, random_batch

from lightning_modules.gates import HeadGates, attention_output_projections, disabled_parameter_masks

LAYERS, HEADS, HIDDEN = 3, 4, 32
HEAD_DIM = HIDDEN // HEADS


def model_and_batch(attn: str, seed: int = 0, layout: str = "xlmr"):
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, attn=attn, seed=seed, layout=layout)
    ids, att = random_batch(batch=5, length=11, seed=seed + 100)
    return model, ids, att


def random_mask(seed: int, *shape: int) -> torch.Tensor:
    """A 0/1 mask with at least one zero and one one in every L×H slice."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(*shape, LAYERS, HEADS, generator=g) > 0.4).float()
    mask[..., 0, 0] = 0.0
    mask[..., 1, 1] = 1.0
    return mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_ones_gates_are_bit_identical_to_the_ungated_model(attn, layout):
    model, ids, att = model_and_batch(attn, seed=1, layout=layout)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=att).logits
        gates = HeadGates(model)
        plain = model(input_ids=ids, attention_mask=att).logits  # hooks installed, no mask
        with gates.applied(torch.ones(LAYERS, HEADS)):
            ones = model(input_ids=ids, attention_mask=att).logits
        with gates.applied(torch.ones(ids.shape[0], LAYERS, HEADS), batch_size=ids.shape[0]):
            ones_per_example = model(input_ids=ids, attention_mask=att).logits
    assert torch.equal(plain, reference)
    assert torch.equal(ones, reference)
    assert torch.equal(ones_per_example, reference)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_gate_equals_zeroing_output_projection_columns(attn, layout):
    model, ids, att = model_and_batch(attn, seed=2, layout=layout)
    mask = random_mask(3)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer, projection in enumerate(attention_output_projections(pruned)):
            for head in range(HEADS):
                if mask[layer, head] == 0:
                    projection.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0.0
        expected = pruned(input_ids=ids, attention_mask=att).logits
        gates = HeadGates(model)
        with gates.applied(mask):
            gated = model(input_ids=ids, attention_mask=att).logits
        ungated = model(input_ids=ids, attention_mask=att).logits
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gated, ungated, atol=1e-4), "the mask should change the logits"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_example_mask_equals_each_example_alone(attn, soft, layout):
    model, ids, att = model_and_batch(attn, seed=4, layout=layout)
    mask = random_mask(5, ids.shape[0])
    if soft:  # gates need not be 0/1 (importance is taken around 1)
        mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(6)) + 0.25
    gates = HeadGates(model)
    with torch.no_grad():
        with gates.applied(mask, batch_size=ids.shape[0]):
            together = model(input_ids=ids, attention_mask=att).logits
        alone = []
        for i in range(ids.shape[0]):
            with gates.applied(mask[i]):
                alone.append(model(input_ids=ids[i : i + 1], attention_mask=att[i : i + 1]).logits)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-6)
    # and differs from applying any single example's mask to the whole batch
    with torch.no_grad(), gates.applied(mask[0]):
        shared = model(input_ids=ids, attention_mask=att).logits
    assert not torch.allclose(together[1:], shared[1:], atol=1e-4)


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gate_gradient_equals_finite_difference(per_example, layout):
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, attn="eager", seed=7, init_std=0.2, layout=layout).double()
    ids, att = random_batch(batch=3, length=9, seed=8)
    labels = torch.tensor([0, 2, 1])
    gates = HeadGates(model)
    shape = (ids.shape[0], LAYERS, HEADS) if per_example else (LAYERS, HEADS)
    base = torch.rand(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5

    def loss(gate: torch.Tensor) -> torch.Tensor:
        with gates.applied(gate):
            logits = model(input_ids=ids, attention_mask=att).logits
        return torch.nn.functional.cross_entropy(logits, labels)

    gate = base.clone().requires_grad_(True)
    loss(gate).backward()
    eps = 1e-6
    numeric = torch.zeros_like(base)
    with torch.no_grad():
        for idx in torch.cartesian_prod(*(torch.arange(s) for s in shape)):
            idx = tuple(idx.tolist())
            plus, minus = base.clone(), base.clone()
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (loss(plus) - loss(minus)) / (2 * eps)
    assert numeric.abs().max() > 1e-4  # the test can see a wrong gradient
    torch.testing.assert_close(gate.grad, numeric, rtol=1e-5, atol=1e-8)


def test_bad_mask_shapes_raise_clear_errors():
    model, ids, att = model_and_batch("eager", seed=10)
    gates = HeadGates(model)
    for shape in [
        (LAYERS,),
        (HEADS, LAYERS + 1),
        (LAYERS, HEADS + 1),
        (LAYERS + 1, HEADS),
        (2, 5, LAYERS, HEADS),
    ]:
        expected = re.escape(f"head mask has shape {shape}; this model needs {(LAYERS, HEADS)}")
        with pytest.raises(ValueError, match=expected):
            with gates.applied(torch.ones(shape)):
                pass
    wrong_batch = torch.ones(ids.shape[0] + 1, LAYERS, HEADS)
    with pytest.raises(ValueError, match=rf"{ids.shape[0] + 1} rows for a batch of {ids.shape[0]}"):
        with gates.applied(wrong_batch, batch_size=ids.shape[0]):
            pass
    # without batch_size the mismatch is still caught when the model runs, not broadcast
    for rows in (ids.shape[0] + 1, 2):
        with pytest.raises(ValueError, match=rf"{rows} rows for a batch of {ids.shape[0]}"):
            with torch.no_grad(), gates.applied(torch.ones(rows, LAYERS, HEADS)):
                model(input_ids=ids, attention_mask=att)
    assert gates.mask is None  # the failed call did not leave a mask behind


@pytest.mark.parametrize("layout", LAYOUTS)
def test_disabled_parameter_masks_mark_exactly_the_heads_slices(layout):
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, seed=11, layout=layout)
    mask = random_mask(12)
    marks = disabled_parameter_masks(model, mask)
    names = {id(p): n for n, p in model.named_parameters()}
    marked_names = {names[id(p)] for p in marks}
    expected_names = {
        f"{'bert' if layout == 'bert' else 'roberta'}.encoder.layer.{layer}.attention.{part}"
        for layer in range(LAYERS)
        for part in (
            "self.query.weight",
            "self.query.bias",
            "self.key.weight",
            "self.key.bias",
            "self.value.weight",
            "self.value.bias",
            "output.dense.weight",
        )
    }
    assert marked_names == expected_names
    for param, off in marks.items():
        name = names[id(param)]
        layer = int(name.split(".")[3])
        reference = torch.zeros(param.shape, dtype=torch.bool)
        for head in range(HEADS):
            if mask[layer, head] == 0:
                block = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                if name.endswith("output.dense.weight"):
                    reference[:, block] = True  # the head's input columns of the output projection
                else:
                    reference[block] = True  # the head's rows of query/key/value
        assert off.dtype == torch.bool and off.shape == param.shape
        assert torch.equal(off, reference), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gated_heads_get_exactly_zero_gradient_on_their_marked_slices(layout):
    """The marks are where gating a head off already zeroes the gradient (and nowhere else)."""
    model = make_tiny_model(LAYERS, HEADS, HIDDEN, seed=13, layout=layout).train(False)
    ids, att = random_batch(batch=4, length=10, seed=14)
    mask = random_mask(15)
    gates = HeadGates(model)
    with gates.applied(mask):
        model(input_ids=ids, attention_mask=att).logits.pow(2).sum().backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for param, off in disabled_parameter_masks(model, mask).items():
        assert torch.all(param.grad[off] == 0)
        if not names[id(param)].endswith("key.bias"):  # softmax ignores the key bias: its gradient is ~0
            assert torch.count_nonzero(param.grad[~off]) > 0.9 * (~off).sum()
