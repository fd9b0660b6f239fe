"""crossling's TracIn scoring against an independent implementation: Captum's TracInCP.

Exact per-example gradients come from one-example backward passes on a tiny XLM-R classifier
built from config (padded inputs); crossling scores those vectors with ``dot`` normalisation.
Captum computes its own gradients from the model, so a wrong sum, sign, weight or transpose
on our side shows up as a mismatch.
"""

import numpy as np
import torch
from captum.influence import TracInCP
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

from analysis.tracin import stream_top_k, tracin_scores

PAD = 1


class Logits(nn.Module):
    """Captum calls ``model(*inputs)`` and expects a tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _tiny_model(seed: int) -> Logits:
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=40,
        pad_token_id=PAD,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.3,
    )
    config._attn_implementation = "eager"
    return Logits(XLMRobertaForSequenceClassification(config)).eval()


def _padded_batch(gen: torch.Generator, n: int, length: int = 11):
    ids = torch.full((n, length), PAD, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, length + 1, (1,), generator=gen))
        ids[i, :k] = torch.randint(3, 60, (k,), generator=gen)
        ids[i, 0] = 0  # <s>
        mask[i, :k] = 1
    labels = torch.randint(0, 2, (n,), generator=gen)
    return ids, mask, labels


def _per_example_gradients(model: Logits, ids, mask, labels) -> np.ndarray:
    """One backward pass per example: the exact gradient of its loss w.r.t. every parameter."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    rows = []
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]).backward()
        rows.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in model.parameters()
                ]
            )
        )
    return torch.stack(rows).double().numpy()


def test_dot_scores_and_top_k_equal_captum_tracincp(tmp_path):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    train = _padded_batch(gen, 9)
    test = _padded_batch(gen, 5)
    model = _tiny_model(0)
    ckpt = tmp_path / "epoch=0.pt"
    torch.save(model.state_dict(), ckpt)

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return 1.0

    captum = TracInCP(
        model,
        torch.utils.data.TensorDataset(*train),
        checkpoints=[str(ckpt)],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=1,
    )
    expected = captum.influence(test).double().numpy()

    load(model, str(ckpt))
    g_train = _per_example_gradients(model, *train)
    g_test = _per_example_gradients(model, *test)
    assert np.abs(g_train).max() > 0 and np.ptp(expected) > 0
    ours = tracin_scores([g_test], [g_train], "dot")
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

    # top-k: captum's proponents / opponents vs our streaming ranking (compare scores: no flaky ties)
    ranked = stream_top_k([g_test], [g_train], m=3, normalization="dot", train_block=2)
    for proponents, top in ((True, ranked.pos), (False, ranked.neg)):
        _, cap_scores = captum.influence(test, k=3, proponents=proponents)
        np.testing.assert_allclose(
            top.score, cap_scores.double().numpy(), rtol=1e-4, atol=1e-6 * np.abs(expected).max()
        )


def test_summed_checkpoints_with_learning_rates_equal_captum(tmp_path):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    train = _padded_batch(gen, 6)
    test = _padded_batch(gen, 3)
    rates = {}
    paths = []
    for e, lr in enumerate((0.5, 2.0)):
        path = tmp_path / f"epoch={e}.pt"
        torch.save(_tiny_model(10 + e).state_dict(), path)
        rates[str(path)] = lr
        paths.append(path)
    model = _tiny_model(10)

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return rates[path]

    captum = TracInCP(
        model,
        torch.utils.data.TensorDataset(*train),
        checkpoints=[str(p) for p in paths],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=1,
    )
    expected = captum.influence(test).double().numpy()
    g_test, g_train = [], []
    for path in paths:
        load(model, str(path))
        g_train.append(_per_example_gradients(model, *train))
        g_test.append(_per_example_gradients(model, *test))
    ours = tracin_scores(g_test, g_train, "dot", lr_weights=[0.5, 2.0])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
