"""Head importance E_x |dL(x)/dxi| against references computed without the gate hooks."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from analysis.masks import MaskError, name_seed
from callbacks.head_importance import (
    accumulate_head_gradients,
    compute_head_importance,
    evaluate_accuracy,
    normalize_importance,
)
from lightning_modules.gates import HeadGates

LAYERS, HEADS, HIDDEN = 2, 3, 24
PAD = 1


def tiny_model(seed: str, dtype=torch.float64, dropout: float = 0.0, layout: str = "xlmr"):
    config = XLMRobertaConfig(
        vocab_size=60,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=32,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=PAD,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    if layout == "bert":  # multilingual-e5 / mBERT: bert.*, pooler + linear head
        config = BertConfig(**{**config.to_dict(), "type_vocab_size": 2})
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(name_seed(seed) % 2**31)
        model = (BertForSequenceClassification if layout == "bert" else XLMRobertaForSequenceClassification)(config)
        # larger random weights than the init so that every head matters noticeably
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def random_examples(seed: str, n: int) -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(name_seed(seed) % 2**31)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=gen))
        ids = torch.randint(3, 60, (length,), generator=gen)
        ids[0], ids[-1] = 0, 2
        out.append((ids, int(torch.randint(0, 2, (1,), generator=gen))))
    return out


def collate(examples) -> dict:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": torch.tensor([y for _, y in examples]),
    }


def hand_gated_loss(model, ids: torch.Tensor, label: int, xi: torch.Tensor) -> torch.Tensor:
    """The loss of one unpadded example with head gates built into the output projections' weights.

    Gating head h of layer l multiplies its slice of the projection input; that equals scaling
    the projection's columns of that head, so no hook is involved.
    """
    head_dim = HIDDEN // HEADS
    params = {}
    for layer in range(LAYERS):
        name = f"{model.base_model_prefix}.encoder.layer.{layer}.attention.output.dense.weight"
        weight = dict(model.named_parameters())[name]
        params[name] = weight * xi[layer].repeat_interleave(head_dim)[None, :]
    logits = functional_call(
        model, params, kwargs={"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    )
    return F.cross_entropy(logits.logits, torch.tensor([label]))


MASK = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # one head already disabled


@pytest.mark.parametrize("layout", ["xlmr", "bert"])
def test_importance_equals_per_example_gradient_of_hand_built_gate(layout):
    model = tiny_model("hand-gate", layout=layout)
    examples = random_examples("hand-gate-data", 7)
    gates = HeadGates(model)
    total, count = accumulate_head_gradients(
        model, gates, [collate(examples[:4]), collate(examples[4:])], MASK
    )
    reference = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for ids, label in examples:
        xi = MASK.to(torch.float64).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(hand_gated_loss(model, ids, label, xi), xi)
        reference += grad.abs()
    assert count == 7
    assert (reference > 1e-6).all()  # every head, disabled one included, has a signal to compare
    torch.testing.assert_close(total, reference, rtol=1e-9, atol=1e-12)
    # the mean, with the disabled head zeroed, is what compute_head_importance reports unnormalised
    imp = compute_head_importance(model, [collate(examples)], MASK, "none", gates)
    expected = reference / 7 * MASK.to(torch.float64)
    torch.testing.assert_close(imp, expected, rtol=1e-9, atol=1e-12)


def test_importance_matches_central_finite_differences():
    model = tiny_model("finite-diff")
    examples = random_examples("finite-diff-data", 4)
    gates = HeadGates(model)
    eps = 1e-6
    reference = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    with torch.no_grad():
        for ids, label in examples:
            batch = collate([(ids, label)])
            for layer in range(LAYERS):
                for head in range(HEADS):
                    losses = []
                    for sign in (1, -1):
                        xi = MASK.to(torch.float64).clone()
                        xi[layer, head] += sign * eps
                        with gates.applied(xi):
                            logits = model(
                                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                            ).logits
                        losses.append(F.cross_entropy(logits, batch["labels"]))
                    reference[layer, head] += ((losses[0] - losses[1]) / (2 * eps)).abs()
    total, count = accumulate_head_gradients(model, gates, [collate(examples)], MASK)
    torch.testing.assert_close(total / count, reference / len(examples), rtol=1e-6, atol=1e-9)


def test_per_example_absolute_values_differ_from_batch_sum():
    """The same input twice, labelled 0 and 1: the two gradients point in opposite directions.

    With z = logit1 - logit0 and v = dz/dxi, example 0's gradient is p1·v and example 1's is
    -p0·v, so E|g| = |v|/2 while |E g| = |p1 - p0|·|v|/2.
    """
    model = tiny_model("opposite")
    ((ids, _),) = random_examples("opposite-data", 1)
    batch = collate([(ids, 0), (ids, 1)])
    gates = HeadGates(model)
    imp = compute_head_importance(model, [batch], None, "none", gates)

    xi = torch.ones(LAYERS, HEADS, dtype=torch.float64, requires_grad=True)
    with gates.applied(xi):
        logits = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits
    (v,) = torch.autograd.grad(logits[0, 1] - logits[0, 0], xi)
    p = logits[0].softmax(-1).detach()
    torch.testing.assert_close(imp, v.abs() / 2, rtol=1e-9, atol=1e-12)

    shared = torch.ones(LAYERS, HEADS, dtype=torch.float64, requires_grad=True)  # one gate for the batch
    with gates.applied(shared):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (batch_grad,) = torch.autograd.grad(F.cross_entropy(logits, batch["labels"], reduction="sum"), shared)
    batch_version = batch_grad.abs() / 2
    torch.testing.assert_close(batch_version, (p[1] - p[0]).abs() * v.abs() / 2, rtol=1e-9, atol=1e-12)
    assert (imp - batch_version > 1e-6 * imp).all()


def test_eval_mode_no_dropout_and_training_mode_restored():
    model = tiny_model("dropout", dropout=0.5).train()
    batch = collate(random_examples("dropout-data", 5))
    gates = HeadGates(model)
    first = compute_head_importance(model, [batch], None, "none", gates)
    second = compute_head_importance(model, [batch], None, "none", gates)
    assert torch.equal(first, second)
    assert model.training
    evaluate_accuracy(model, gates, [batch])
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # only the gate is differentiated


def test_normalizations():
    gen = np.random.default_rng(name_seed("normalize"))
    raw = torch.as_tensor(gen.uniform(0.1, 2.0, size=(3, 4)))
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    l2 = normalize_importance(raw, "layer_l2", mask)
    for layer in range(3):
        live = [raw[layer, h].item() if mask[layer, h] else 0.0 for h in range(4)]
        norm = sum(x * x for x in live) ** 0.5
        for h in range(4):
            assert l2[layer, h].item() == pytest.approx(live[h] / norm, rel=1e-12)
    mm = normalize_importance(raw, "minmax", mask)
    live = raw[mask.bool()]
    lo, hi = live.min().item(), live.max().item()
    for layer in range(3):
        for h in range(4):
            want = (raw[layer, h].item() - lo) / (hi - lo) if mask[layer, h] else 0.0
            assert mm[layer, h].item() == pytest.approx(want, abs=1e-12)
    none = normalize_importance(raw, "none", mask)
    assert torch.equal(none, torch.where(mask.bool(), raw, torch.zeros_like(raw)))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_importance(raw, "softmax")


def test_mask_of_wrong_shape_is_rejected():
    model = tiny_model("shape")
    batch = collate(random_examples("shape-data", 2))
    with pytest.raises(MaskError, match=r"shape \(3, 3\).*\(2, 3\)"):
        compute_head_importance(model, [batch], torch.ones(3, 3))


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        model = tiny_model("ddp")
        examples = random_examples("ddp-data", 6)
        mine = examples[rank::world][: 3 - rank]  # unequal shares: ranks see 3 and 2 examples
        imp = compute_head_importance(model, [collate(mine)], MASK, "layer_l2")
        if rank == 0:
            torch.save(imp, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_all_reduces_sums_and_counts_before_normalising():
    model = tiny_model("ddp")
    examples = random_examples("ddp-data", 6)
    used = examples[0::2][:3] + examples[1::2][:2]
    single = compute_head_importance(model, [collate(used)], MASK, "layer_l2")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "imp.pt")
        # fork: the workers inherit the imports (spawning re-imports transformers: ~15 s)
        torch.multiprocessing.start_processes(
            _ddp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, start_method="fork"
        )
        distributed = torch.load(out, weights_only=True)
    torch.testing.assert_close(distributed, single, rtol=1e-9, atol=1e-12)
