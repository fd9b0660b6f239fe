"""The fidelity stage: its exact scores equal those of one-example backward passes, its verdicts
equal a direct recount, holding the test side in chunks changes nothing, and bad requests fail
with one line before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_pawsx_datamodule
from test_sketch_store import make_run_dir, new_module

from analysis.projection_error import load_projection_error
from callbacks.checkpoints import CheckpointError, list_checkpoints, load_weights
from callbacks.fidelity_sample import (
    FidelityError,
    FidelityOptions,
    compare_scores,
    sample_indices,
    score_sample,
)
from callbacks.sketching import SketchOptions, get_sketcher
from lightning_modules.stages.fidelity import measure_fidelity

SKETCH = SketchOptions(k=4, seed=3, precision="32")


@pytest.fixture(scope="module")
def dm():
    return small_pawsx_datamodule(
        languages=["en", "de", "ko"], train_per_language=12, dev_per_language=4, test_per_language=5, eval_batch_size=8
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dm):
    return make_run_dir(tmp_path_factory.mktemp("fidelity") / "run", dm.languages)


def one_example_gradient(module, example) -> torch.Tensor:
    """The obvious reference: backward of one example's loss; weight then bias of each sketched layer."""
    model = module.model
    model.eval()
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    F.cross_entropy(logits, torch.tensor([example.record.label])).backward()
    layers = get_sketcher(model, SKETCH).layers
    out = torch.cat([torch.cat([mod.weight.grad.reshape(-1), mod.bias.grad]) for _, mod in layers])
    model.zero_grad(set_to_none=True)
    return out.double()


def slow_verdict(approx, exact, train_langs, test_langs, n_lang, m):
    """Recall and share error by full argsort and explicit counting."""
    out = {}
    for sign, order in (("pos", -1), ("neg", 1)):
        a = np.argsort(order * approx, axis=1, kind="stable")[:, :m]
        e = np.argsort(order * exact, axis=1, kind="stable")[:, :m]
        out[f"recall_{sign}"] = np.mean([len(set(x) & set(y)) / m for x, y in zip(a, e)])
        cells = []
        for t in range(n_lang):
            rows = np.flatnonzero(test_langs == t)
            if rows.size:
                for r in range(n_lang):
                    share_a = np.mean([100 * np.sum(train_langs[a[i]] == r) / m for i in rows])
                    share_e = np.mean([100 * np.sum(train_langs[e[i]] == r) / m for i in rows])
                    cells.append(abs(share_a - share_e))
        out[sign] = (np.mean(cells), np.max(cells))
    return out


def test_exact_scores_and_verdicts_match_one_example_backward_passes(run_dir, dm):
    module = new_module(dm.languages)
    load_weights(module, dict(list_checkpoints(run_dir))[1])
    test_idx = sample_indices(len(dm.dataset("test")), 6, "test", 0)
    train_idx = sample_indices(len(dm.dataset("train")), 20, "train", 0)
    options = FidelityOptions(n_test=6, n_train=20, m=4, batch_size=5)
    scores = score_sample(module, dm, test_idx, train_idx, None, SKETCH, options)
    gt = torch.stack([one_example_gradient(module, dm.dataset("test").examples[i]) for i in test_idx])
    gr = torch.stack([one_example_gradient(module, dm.dataset("train").examples[i]) for i in train_idx])
    np.testing.assert_allclose(scores.exact, (F.normalize(gt, dim=1) @ F.normalize(gr, dim=1).T).numpy(),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(scores.sketch, scores.exact, atol=1e-3)  # d = 16: a real approximation
    # one test example per chunk: the same numbers
    tiny_budget = FidelityOptions(n_test=6, n_train=20, m=4, batch_size=5, max_exact_gb=gt.shape[1] * 4.5 / 2**30)
    chunked = score_sample(module, dm, test_idx, train_idx, None, SKETCH, tiny_budget)
    assert chunked.chunks == 6 and scores.chunks == 1
    # other batches, other float32 kernels: equal up to rounding of a dot over every parameter (measured 5e-6)
    np.testing.assert_allclose(chunked.exact, scores.exact, rtol=2e-5, atol=1e-5)
    np.testing.assert_array_equal(chunked.sketch, scores.sketch)
    got = compare_scores(scores.sketch, scores.exact, scores.train_langs, scores.test_langs, 3, 4)
    want = slow_verdict(scores.sketch, scores.exact, scores.train_langs, scores.test_langs, 3, 4)
    for sign in ("pos", "neg"):
        assert got[f"recall_{sign}"] == pytest.approx(want[f"recall_{sign}"])
        assert (got["share_error_pp"][sign]["mean"], got["share_error_pp"][sign]["max"]) == pytest.approx(want[sign])
    same = compare_scores(scores.exact, scores.exact, scores.train_langs, scores.test_langs, 3, 4)
    assert same["recall_pos"] == same["recall_neg"] == 1.0 and same["share_error_pp"]["neg"]["max"] == 0.0


def test_the_stage_writes_what_the_report_reads(run_dir, dm):
    out = measure_fidelity(new_module(dm.languages), dm, run_dir, SKETCH, FidelityOptions(n_test=6, n_train=20, batch_size=5))
    result = json.loads(out.read_text())
    assert result["m"] == 1 and result["epoch"] == 1 and result["n_train"] == 20  # m: 5 % of the sample
    err = load_projection_error(run_dir)
    assert err.max_pp == {s: result["share_error_pp"][s]["max"] for s in ("pos", "neg")}
    assert not list(out.parent.glob("*.tmp*"))


@pytest.mark.parametrize(
    "options, message",
    [
        (FidelityOptions(n_train=10_000), r"fidelity.n_train=10000: the run's train split has 36 examples"),
        (FidelityOptions(n_test=0, n_train=20), r"fidelity.n_test=0: the run's test split has 15 examples"),
        (FidelityOptions(n_test=4, n_train=20, max_exact_gb=1e-9), r"cannot hold one test example's exact gradient"),
    ],
)
def test_bad_requests_fail_before_writing(tmp_path, dm, options, message):
    run_dir = make_run_dir(tmp_path / "run", dm.languages)
    with pytest.raises(FidelityError, match=message):
        measure_fidelity(new_module(dm.languages), dm, run_dir, SKETCH, options)
    assert not (run_dir / "fidelity").exists()


def test_a_sketch_too_large_for_memory_and_a_run_without_checkpoints_are_refused(tmp_path, dm):
    run_dir = make_run_dir(tmp_path / "run", dm.languages)
    with pytest.raises(FidelityError, match=r"needs about .* GiB, .* GiB is available: lower fidelity.max_exact_gb, sketch.k"):
        measure_fidelity(new_module(dm.languages), dm, run_dir, SketchOptions(k=60_000, precision="32"),
                     FidelityOptions(n_test=4, n_train=20))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no epoch=<E>.ckpt files"):
        measure_fidelity(new_module(dm.languages), dm, empty, SKETCH, FidelityOptions(n_test=4, n_train=20))
    assert not (run_dir / "fidelity").exists() and not (empty / "fidelity").exists()
