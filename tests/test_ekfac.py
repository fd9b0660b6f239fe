"""EK-FAC influence through kronfluence (lightning_modules/stages/ekfac.py) against slow references built
from one-example gradients: the EK-FAC construction itself, and the exact damped Fisher inverse it
approximates, on a tiny classifier whose head is small enough to form the Fisher; and the set-up that
installs kronfluence without torchvision."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.base import Example, make_collate
from lightning_modules.classifier import SequenceClassifier
from lightning_modules.stages.ekfac import EkfacOptions, ekfac_scores

HEAD = "model.classifier.out_proj"


def test_the_setup_installs_kronfluence_and_no_torchvision():
    assert importlib.util.find_spec("kronfluence") is not None
    assert importlib.util.find_spec("torchvision") is None
    assert getattr(importlib.util.find_spec("tests"), "origin", None) is None  # kronfluence's own tests/ removed
    result = subprocess.run([sys.executable, "-c", "import pytorch_lightning, kronfluence.analyzer"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny():
    """A tiny classifier with a head worth attributing to, fresh random examples, their head gradients."""
    torch.manual_seed(3)
    module = SequenceClassifier("tiny-random", languages=["en", "de"]).eval()
    with torch.no_grad():
        for p in module.model.classifier.parameters():
            p.normal_(0, 0.5)
    rng = np.random.default_rng(5)

    def row(i):
        ids = rng.integers(5, 90, size=int(rng.integers(6, 12))).tolist()
        return Example(index=i, lang=int(rng.integers(0, 2)), record=_Label(int(rng.integers(0, 2))), input_ids=ids)

    examples = [row(i) for i in range(46)]
    return module, examples[:40], examples[40:]


class _Label:
    """The one field of a record the loss reads."""

    def __init__(self, label: int):
        self.label = label


def head_gradients(module, examples) -> torch.Tensor:
    """(n, out, in + 1) float64 gradient of each example's loss over the head's weight and bias, one example
    per backward pass."""
    head = dict(module.named_modules())[HEAD]
    out = []
    for e in examples:
        module.zero_grad()
        ids = torch.tensor([e.input_ids])
        F.cross_entropy(module(ids, torch.ones_like(ids), None), torch.tensor([e.record.label])).backward()
        out.append(torch.cat([head.weight.grad, head.bias.grad[:, None]], 1).double().clone())
    return torch.stack(out)


def explicit_ekfac(train: torch.Tensor, test: torch.Tensor, damping: float) -> torch.Tensor:
    """EK-FAC by its definition, from one-example gradients G = δ aᵀ of a layer fed one vector per example:
    eigenbases Q_A, Q_S of E[a aᵀ] and E[δ δᵀ], eigenvalues refitted as E[(Q_Sᵀ G Q_A)²], and the test
    gradient preconditioned in that basis."""
    u, s, vh = torch.linalg.svd(train)
    delta, a = u[:, :, 0] * s[:, :1], vh[:, 0, :]
    delta, a = delta * a[:, -1:], a / a[:, -1:]  # the bias column's input is 1
    n = train.shape[0]
    _, qa = torch.linalg.eigh(a.T @ a / n)
    _, qs = torch.linalg.eigh(delta.T @ delta / n)
    refit = ((qs.T @ train @ qa) ** 2).mean(0)
    pre = qs @ ((qs.T @ test @ qa) / (refit + damping)) @ qa.T
    return torch.einsum("qoi,noi->qn", pre, train)


def test_kronfluence_ekfac_equals_its_explicit_construction(tiny):
    module, train, test = tiny
    collate = make_collate(1)
    scores, record = ekfac_scores(module, [HEAD], train, test, collate,
                                  EkfacOptions(damping=1e-3, fisher="empirical", batch_size=8))
    reference = explicit_ekfac(head_gradients(module, train), head_gradients(module, test), 1e-3).numpy()
    assert scores.shape == (len(test), len(train)) and record["layers"] == 1
    np.testing.assert_allclose(scores, reference, rtol=0, atol=2e-3 * np.abs(reference).max())
    assert not any(type(m).__name__ == "TrackedModule" for m in module.modules())  # the caller's model is untouched


def test_ekfac_is_nearer_the_exact_damped_fisher_inverse_than_gradient_dot_products(tiny):
    module, train, test = tiny
    g, q = head_gradients(module, train), head_gradients(module, test)
    flat, flat_q = g.reshape(len(train), -1), q.reshape(len(test), -1)
    fisher = flat.T @ flat / len(train)
    mean_eig = float(torch.linalg.eigvalsh(fisher).mean())
    dot = (flat_q @ flat.T).numpy().ravel()
    for factor in (0.1, 1.0):
        lam = factor * mean_eig
        exact = (flat_q @ torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0], dtype=torch.float64),
                                             flat.T)).numpy().ravel()
        scores, _ = ekfac_scores(module, [HEAD], train, test, make_collate(1),
                                 EkfacOptions(damping=lam, fisher="empirical", batch_size=8))
        assert np.corrcoef(scores.ravel(), exact)[0, 1] > np.corrcoef(dot, exact)[0, 1] + 0.1


def test_a_layer_that_is_not_linear_is_refused(tiny):
    module, train, test = tiny
    with pytest.raises(ValueError, match="ekfac: no linear layer named"):
        ekfac_scores(module, ["model.classifier"], train, test, make_collate(1))
