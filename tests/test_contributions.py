"""Language contributions: shares, averages, the correct-prediction filter and planted structure."""

import numpy as np
import pytest

from analysis.contributions import (
    ContributionTable,
    common_correct,
    in_language_share,
    language_codes,
    language_shares,
    mean_matrix,
    positions_of,
    read_contributions_csv,
    train_language_lookup,
)
from analysis.tracin import stream_top_k

LANGS = ["en", "de", "fr", "ko"]


def test_shares_sum_to_100_and_match_a_loop():
    rng = np.random.default_rng(0)
    train_indices = np.sort(rng.choice(500, size=200, replace=False))
    train_langs = rng.choice(LANGS, size=200)
    lookup = train_language_lookup(train_indices, train_langs, LANGS)
    top = rng.choice(train_indices, size=(30, 17))
    shares = language_shares(top, lookup, len(LANGS))
    np.testing.assert_allclose(shares.sum(axis=1), 100.0)
    lang_of = dict(zip(train_indices.tolist(), train_langs.tolist()))
    for i in range(30):
        for j, lang in enumerate(LANGS):
            assert np.isclose(shares[i, j], 100.0 * sum(lang_of[int(t)] == lang for t in top[i]) / 17)
    test_codes = rng.integers(0, 3, size=30)  # no "ko" test examples
    mat, counts = mean_matrix(shares, test_codes, len(LANGS))
    for g in range(3):
        np.testing.assert_allclose(mat[g], shares[test_codes == g].mean(axis=0))
        np.testing.assert_allclose(mat[g].sum(), 100.0)
    assert counts[3] == 0 and np.isnan(mat[3]).all()
    np.testing.assert_allclose(in_language_share(shares, test_codes), shares[np.arange(30), test_codes])
    with pytest.raises(ValueError, match="no known language"):
        language_shares(np.array([[501]]), lookup, len(LANGS))
    with pytest.raises(ValueError, match="not among"):
        language_codes(["xx"], LANGS)


def test_correct_filter_keeps_exactly_the_intersection():
    rng = np.random.default_rng(1)
    tables, expected = [], None
    for _ in range(3):
        indices = np.sort(rng.choice(80, size=60, replace=False))
        correct = rng.random(60) < 0.8
        tables.append((indices, correct))
        good = {int(i) for i, c in zip(indices, correct) if c}
        expected = good if expected is None else expected & good
    kept = common_correct(tables)
    assert kept.tolist() == sorted(expected)
    # an example missing from one model's rankings is dropped, even if correct elsewhere
    assert common_correct(
        [(np.array([1, 2, 3]), np.array([True, True, True])), (np.array([2, 3]), np.array([True, False]))]
    ).tolist() == [2]
    rows = positions_of(np.array([9, 4, 7]), np.array([4, 9]))
    assert rows.tolist() == [1, 0]
    with pytest.raises(ValueError):
        positions_of(np.array([9, 4, 7]), np.array([5]))


def _planted(rng, langs_train, n_test_per_lang=12, d=24, n_ckpt=2):
    """Sketches where a language's examples share a direction: test examples of l correlate with training
    examples of l. ``langs_train`` is the language each training row is labelled with."""
    n_lang = len(LANGS)
    directions = rng.normal(size=(n_ckpt, n_lang, d))
    true_train_lang = np.repeat(np.arange(n_lang), 25)
    test_lang = np.repeat(np.arange(n_lang), n_test_per_lang)
    trains = [
        directions[e][true_train_lang] * 3 + rng.normal(size=(true_train_lang.size, d)) for e in range(n_ckpt)
    ]
    tests = [directions[e][test_lang] * 3 + rng.normal(size=(test_lang.size, d)) for e in range(n_ckpt)]
    ranked = stream_top_k(
        [t.astype(np.float32) for t in tests], [t.astype(np.float32) for t in trains], m=20, train_block=16
    )
    lookup = train_language_lookup(np.arange(true_train_lang.size), langs_train, LANGS)
    return {
        s: mean_matrix(language_shares(t.idx, lookup, n_lang), test_lang, n_lang)[0]
        for s, t in (("pos", ranked.pos), ("neg", ranked.neg))
    }


def test_planted_language_structure_gives_a_dominant_diagonal_and_shuffling_removes_it():
    rng = np.random.default_rng(2)
    true_langs = np.repeat(LANGS, 25)
    mats = _planted(rng, true_langs)
    pos = mats["pos"]
    assert np.diag(pos).min() > 90 and pos[~np.eye(4, dtype=bool)].max() < 10
    shuffled = rng.permutation(true_langs)
    pos_shuffled = _planted(np.random.default_rng(2), shuffled)["pos"]
    assert np.diag(pos_shuffled).max() < 60
    np.testing.assert_allclose(pos_shuffled.sum(axis=1), 100.0)


def test_contribution_table_csv_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mats = {s: rng.uniform(0, 100, (4, 4)) for s in ("pos", "neg")}
    table = ContributionTable(
        LANGS,
        mats,
        {s: m - 1 for s, m in mats.items()},
        {s: m + 1 for s, m in mats.items()},
        np.array([5, 6, 0, 2]),
    )
    path = table.write_csv(tmp_path / "contributions.csv")
    header = path.read_text().splitlines()[0]
    assert header == "test_lang,train_lang,sign,percent,ci_low,ci_high,n_test"
    back = read_contributions_csv(path)
    assert back.languages == LANGS
    for s in ("pos", "neg"):
        np.testing.assert_allclose(back.percent[s], mats[s], rtol=1e-5)
        np.testing.assert_allclose(back.ci_high[s], mats[s] + 1, rtol=1e-5)
    assert back.n_test.tolist() == [5, 6, 0, 2]
