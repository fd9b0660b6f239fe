"""TracIn scoring and exact streaming top-k against obviously-correct references."""

import numpy as np
import pytest

from analysis.tracin import (
    TopKAccumulator,
    normalize,
    plan_blocks,
    rank_top_k,
    row_scales,
    stream_top_k,
    tracin_scores,
)


def test_three_normalizations_on_hand_made_vectors():
    test = np.array([[3.0, 4.0]], dtype=np.float32)  # norm 5
    train = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [-6.0, 8.0]], dtype=np.float32)  # norms 1, 2, 0, 10
    # by hand: dots are 3, 8, 0, 14
    np.testing.assert_allclose(tracin_scores([test], [train], "dot"), [[3.0, 8.0, 0.0, 14.0]])
    np.testing.assert_allclose(tracin_scores([test], [train], "train-norm"), [[3.0, 4.0, 0.0, 1.4]])
    np.testing.assert_allclose(tracin_scores([test], [train], "cosine"), [[0.6, 0.8, 0.0, 0.28]])
    # a second checkpoint and per-checkpoint weights: Σ_e w_e · score_e
    test2 = np.array([[0.0, -1.0]], dtype=np.float32)
    train2 = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.5]], dtype=np.float32)
    expected_cos2 = np.array([[-1 / np.sqrt(2), -1.0, 0.0, -1.0]])
    np.testing.assert_allclose(
        tracin_scores([test, test2], [train, train2], "cosine", [0.5, 2.0]),
        0.5 * np.array([[0.6, 0.8, 0.0, 0.28]]) + 2.0 * expected_cos2,
    )
    np.testing.assert_allclose(row_scales(train, "cosine", "train"), [1.0, 0.5, 0.0, 0.1])
    np.testing.assert_allclose(row_scales(test, "train-norm", "test"), [1.0])
    np.testing.assert_allclose(normalize(test, "cosine", "test"), [[0.6, 0.8]])
    with pytest.raises(ValueError, match="unknown normalization"):
        row_scales(test, "cos", "test")
    with pytest.raises(ValueError, match="lr_weights"):
        tracin_scores([test], [train], "dot", [1.0, 2.0])


def _reference_top(scores: np.ndarray, m: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Full stable argsort: on equal scores the lower column comes first."""
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")[:, :m]
    return order, np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("block", [1, 3, 7, 16, 50, 1000])
def test_rank_top_k_equals_full_argsort(block):
    rng = np.random.default_rng(block)
    scores = rng.standard_normal((23, 157))
    m = 11  # blocks of 3 or 7 split the top-m across many boundaries
    for largest in (True, False):
        got = rank_top_k(scores, m, largest, block_size=block)
        ref_idx, ref_score = _reference_top(scores, m, largest)
        np.testing.assert_array_equal(got.score, ref_score)
        np.testing.assert_array_equal(np.take_along_axis(scores, got.idx, 1), got.score)
        assert all(len(set(row)) == m for row in got.idx.tolist())


def test_ties_lower_train_index_wins_across_blocks():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(30, 60)).astype(np.float64)  # many exact ties
    for block in (2, 5, 9, 60):
        for largest in (True, False):
            got = rank_top_k(scores, 13, largest, block_size=block)
            ref_idx, ref_score = _reference_top(scores, 13, largest)
            np.testing.assert_array_equal(got.idx, ref_idx)
            np.testing.assert_array_equal(got.score, ref_score)


def test_stream_top_k_matches_full_matrix_summed_and_per_checkpoint():
    rng = np.random.default_rng(2)
    n_ckpt, d = 3, 12
    tests = [rng.standard_normal((19, d)).astype(np.float32) for _ in range(n_ckpt)]
    trains = [rng.standard_normal((211, d)).astype(np.float32) for _ in range(n_ckpt)]
    weights = [0.3, 1.0, 2.5]
    for normalization in ("cosine", "train-norm", "dot"):
        full = tracin_scores(tests, trains, normalization, weights)
        got = stream_top_k(
            tests, trains, m=17, normalization=normalization, lr_weights=weights, train_block=13, test_block=4
        )
        for top, largest in ((got.pos, True), (got.neg, False)):
            _, ref_score = _reference_top(full, 17, largest)
            np.testing.assert_allclose(top.score, ref_score, rtol=0, atol=1e-12)
            np.testing.assert_allclose(np.take_along_axis(full, top.idx, 1), top.score, rtol=0, atol=1e-12)
        for e in range(n_ckpt):
            alone = tracin_scores([tests[e]], [trains[e]], normalization)
            np.testing.assert_allclose(
                got.pos_by_ckpt[e].score, _reference_top(alone, 17, True)[1], atol=1e-12
            )
            np.testing.assert_allclose(
                got.neg_by_ckpt[e].score, _reference_top(alone, 17, False)[1], atol=1e-12
            )
    # float32 arithmetic ranks the same up to rounding
    got32 = stream_top_k(tests, trains, m=5, train_block=50, dtype=np.float32)
    full = tracin_scores(tests, trains)
    np.testing.assert_allclose(got32.pos.score, _reference_top(full, 5, True)[1], atol=1e-5)


def test_stream_top_k_caps_m_and_plans_blocks():
    rng = np.random.default_rng(3)
    tests = [rng.standard_normal((4, 6))]
    trains = [rng.standard_normal((5, 6))]
    got = stream_top_k(tests, trains, m=100, per_checkpoint=False)
    assert got.pos.idx.shape == (4, 5) and got.pos_by_ckpt == []
    np.testing.assert_array_equal(np.sort(got.pos.idx, axis=1), np.tile(np.arange(5), (4, 1)))
    t_rows, r_rows = plan_blocks(2500, 10000, 4096, 5, 100, memory_mb=512)
    assert 1 <= t_rows <= 2500 and 100 <= r_rows <= 10000
    working = (t_rows * 4096 * 5 + r_rows * 4096 * 5 + t_rows * r_rows * 10) * 8
    assert working < 2 * 512 * 2**20


def test_non_finite_sketch_is_an_error():
    rng = np.random.default_rng(5)
    tests = [rng.standard_normal((3, 4)) for _ in range(2)]
    trains = [rng.standard_normal((9, 4)) for _ in range(2)]
    trains[1][6, 2] = np.inf  # one checkpoint, one block: still caught through the sum
    with pytest.raises(ValueError, match="non-finite"):
        stream_top_k(tests, trains, m=2, train_block=4, normalization="dot", lr_weights=[1.0, 0.0])


def test_accumulator_rejects_bad_blocks():
    acc = TopKAccumulator(2, 3)
    acc.update(np.ones((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="increasing"):
        acc.update(np.ones((2, 2)), np.array([1, 2]))
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(np.array([[1.0], [np.nan]]), np.array([5]))
