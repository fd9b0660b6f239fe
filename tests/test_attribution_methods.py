"""Attribution methods against slow references: TRAK's kernel against an explicit damped least-squares solve,
and its rankings against a full argsort of the explicitly summed score matrix."""

from __future__ import annotations

import numpy as np
import pytest
from test_report import EPOCHS, LANGS, N_TEST, N_TRAIN, OPTS, D, make_run

from analysis.influence import InfluenceError, InfluenceOptions, load_topk, run_influence
from analysis.influence.methods import prepare_scores, trak_transform
from analysis.sketch_store import read_sketch


def ridge_scores(train: np.ndarray, test: np.ndarray, lam: float) -> np.ndarray:
    """φ_testᵀ β_j with β_j = argmin ‖Φβ − e_j‖² + λ‖β‖² = (ΦᵀΦ + λI)⁻¹ φ_j, by an augmented least squares."""
    n, d = train.shape
    augmented = np.vstack([train, np.sqrt(lam) * np.eye(d)])
    targets = np.vstack([np.eye(n), np.zeros((d, n))])
    beta, *_ = np.linalg.lstsq(augmented, targets, rcond=None)  # (d, n): column j is β_j
    return test @ beta


@pytest.mark.parametrize("n,d", [(40, 12), (9, 30)])  # more examples than dimensions, and fewer (singular ΦᵀΦ)
def test_trak_scores_equal_an_explicit_damped_least_squares(n, d):
    rng = np.random.default_rng(n + d)
    train = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=d)  # unequal scales: the kernel matters
    test = rng.normal(size=(7, d))
    psi, lam = trak_transform(train.astype(np.float32), test.astype(np.float32), damping=0.3)
    train32 = train.astype(np.float32).astype(np.float64)
    assert lam == pytest.approx(0.3 * (train32**2).sum() / d, rel=1e-9)
    expected = ridge_scores(train32, test.astype(np.float32).astype(np.float64), lam)
    np.testing.assert_allclose(psi @ train32.T, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    plain = test @ train.T  # TracIn's dot product ranks otherwise: the kernel is not a rescaling
    assert (np.argsort(-expected, axis=1)[:, :3] != np.argsort(-plain, axis=1)[:, :3]).any()


def test_tracin_is_the_sketches_as_they_are():
    rng = np.random.default_rng(0)
    tests, trains = [rng.normal(size=(3, 5))], [rng.normal(size=(4, 5))]
    prepared = prepare_scores("tracin", tests, trains, "cosine", 0.1)
    assert prepared.tests[0] is tests[0] and prepared.normalization == "cosine"


def test_trak_rankings_are_the_top_m_of_the_summed_kernel_scores(tmp_path):
    run = tmp_path / "full"
    make_run(run, ["full"], {"full": LANGS}, seed=3)
    options = InfluenceOptions(**OPTS, method="trak", trak_damping=0.5)
    done = run_influence(run, ["full"], options)
    assert done["full"] == run / "influence-trak" / "full"
    assert not (run / "influence").exists()  # TracIn's folder is left to TracIn
    top = load_topk(done["full"] / "topk.npz")
    total = 0.0
    for epoch in EPOCHS:
        train, test = (np.asarray(read_sketch(run, epoch, "full", s).data, dtype=np.float64) for s in ("train", "test"))
        lam = 0.5 * (train**2).sum() / D
        total = total + ridge_scores(train, test, lam)
    m = OPTS["m"]
    expected = np.argsort(-total, axis=1, kind="stable")[:, :m]
    train_idx = read_sketch(run, EPOCHS[-1], "full", "train").indices
    test_idx = read_sketch(run, EPOCHS[-1], "full", "test").indices
    order = np.argsort(test_idx)
    np.testing.assert_array_equal(top["pos_idx"], train_idx[expected[order]])
    np.testing.assert_allclose(top["pos_score"], np.take_along_axis(total, expected, 1)[order], rtol=1e-6)
    assert top.meta["method"]["full"]["method"] == "trak" and len(top.meta["method"]["full"]["lambda"]) == 3
    assert top["pos_idx"].shape == (len(LANGS) * N_TEST, m) and N_TRAIN * len(LANGS) > m


def test_an_unknown_method_or_damping_is_one_clear_error():
    with pytest.raises(InfluenceError, match="method must be one of"):
        InfluenceOptions(method="lissa").check()
    with pytest.raises(InfluenceError, match="trak_damping must be > 0"):
        InfluenceOptions(method="trak", trak_damping=0.0).check()


@pytest.mark.parametrize("layout", ["xlmr", "bert"])
def test_a_representation_is_the_first_tokens_final_hidden_state_under_the_head_mask(layout):
    """Reference: transformers' own hidden states (output_hidden_states), one example at a time."""
    import torch
    from helpers import make_tiny_model, random_batch

    from callbacks.sketching import Sketcher, SketchOptions
    from lightning_modules.gates import HeadGates

    model = make_tiny_model(2, 4, 16, 100, seed=3, layout=layout, init_std=0.2)
    ids, att = random_batch(4, 9, 100, seed=4)
    batch = {"input_ids": ids, "attention_mask": att, "labels": torch.tensor([0, 1, 2, 1])}
    mask = (torch.rand(4, 2, 4, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    gates = HeadGates(model)
    reps, losses, preds = Sketcher(model, SketchOptions(kind="representation", precision="32"))(model, gates, batch, mask)
    assert reps.shape == (4, 16)
    for b in range(4):
        n = int(att[b].sum())
        with torch.no_grad(), gates.applied(mask[b]):
            out = model(input_ids=ids[b : b + 1, :n], output_hidden_states=True)
        torch.testing.assert_close(reps[b], out.hidden_states[-1][0, 0], rtol=1e-5, atol=1e-5)
        assert int(preds[b]) == int(out.logits.argmax())
        expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"][b : b + 1])
        torch.testing.assert_close(losses[b], expected, rtol=1e-5, atol=1e-6)
    gates.remove()


def test_repsim_ranks_the_cosine_of_the_representations_the_sketch_stage_wrote(tmp_path):
    from helpers import small_pawsx_datamodule
    from test_sketch_store import make_run_dir, new_module, run_stage

    from callbacks.sketching import SketchOptions

    dm = small_pawsx_datamodule(languages=["en", "de", "ko"], train_per_language=16, dev_per_language=4,
                                test_per_language=6, eval_batch_size=16)
    run = make_run_dir(tmp_path / "run", dm.languages)
    run_stage(run, dm, conditions=("full",), options=SketchOptions(kind="representation", precision="32"))
    assert not (run / "sketches").exists()  # gradient sketches stay apart
    done = run_influence(run, ["full"], InfluenceOptions(m=5, bootstrap_resamples=20, method="repsim"))
    assert done["full"] == run / "influence-repsim" / "full"
    top = load_topk(done["full"] / "topk.npz")
    total = 0.0
    for epoch in (0, 1):
        train, test = (np.asarray(read_sketch(run / "representations", epoch, "full", s).data, dtype=np.float64)
                       for s in ("train", "test"))
        # the hidden size: a representation, not a gradient sketch
        assert train.shape[1] == new_module(dm.languages).model.config.hidden_size
        total = total + np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in train] for a in test])
    expected = np.argsort(-total, axis=1, kind="stable")[:, :5]
    train_idx = read_sketch(run / "representations", 1, "full", "train").indices
    order = np.argsort(read_sketch(run / "representations", 1, "full", "test").indices)
    np.testing.assert_array_equal(top["pos_idx"], train_idx[expected[order]])
    missing = run_influence(tmp_path / "run", ["full"], InfluenceOptions(m=5, method="trak"))
    assert missing == {}  # no gradient sketches: TRAK skips the condition (an error with strict)
