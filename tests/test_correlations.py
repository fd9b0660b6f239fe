"""Correlations against hand formulas (the mask statistics they correlate: test_mask_stats.py)."""

import numpy as np
from scipy import stats

from analysis.correlations import (
    SpecialisationPoint,
    correlate,
    cross_language_points,
    per_layer_correlations,
    specialisation_vs_accuracy,
)
from analysis.mask_stats import mask_cosine_per_layer


def _pearson_by_hand(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc))
    t = r * np.sqrt((x.size - 2) / (1 - r**2))
    return r, 2 * stats.t.sf(abs(t), x.size - 2)


def _ranks(v):
    """Average ranks (ties share the mean rank), written out by hand."""
    v = np.asarray(v, float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_correlate_matches_hand_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    y = 0.6 * x + rng.normal(size=25)
    y[3] = y[7]  # a tie for the ranks
    c = correlate(x, y)
    r, p = _pearson_by_hand(x, y)
    np.testing.assert_allclose([c.pearson_r, c.pearson_p], [r, p], rtol=1e-9)
    rs, ps = _pearson_by_hand(_ranks(x), _ranks(y))
    np.testing.assert_allclose(c.spearman_r, rs, rtol=1e-9)
    np.testing.assert_allclose(c.spearman_p, ps, rtol=1e-6)
    slope = ((x - x.mean()) @ (y - y.mean())) / ((x - x.mean()) @ (x - x.mean()))
    np.testing.assert_allclose([c.slope, c.intercept], [slope, y.mean() - slope * x.mean()], rtol=1e-9)
    assert c.n == 25


def test_correlate_undefined_cases_are_nan():
    assert np.isnan(correlate([1, 2], [3, 4]).pearson_r)
    assert np.isnan(correlate([1, 1, 1, 1], [1, 2, 3, 4]).spearman_r)
    c = correlate([1, 2, np.nan, 4, 5], [2, 4, 100, 8, 10])  # NaN pair dropped
    assert c.n == 4 and np.isclose(c.pearson_r, 1.0)


def test_cross_language_points_use_off_diagonal_cells_in_order():
    langs = ["en", "de", "fr"]
    sim = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, 0.9], [0.5, 0.9, 1.0]])
    infl = 10 * sim + 3
    infl[np.diag_indices(3)] = 99  # the diagonal must be ignored
    pts = cross_language_points(sim, infl, langs)
    assert list(zip(pts.test_lang, pts.train_lang)) == [
        ("en", "de"),
        ("en", "fr"),
        ("de", "en"),
        ("de", "fr"),
        ("fr", "en"),
        ("fr", "de"),
    ]
    np.testing.assert_allclose(pts.y, 10 * pts.x + 3)
    np.testing.assert_allclose([pts.correlation.pearson_r, pts.correlation.slope], [1.0, 10.0])


def test_per_layer_correlations_single_out_the_informative_layer():
    rng = np.random.default_rng(4)
    langs = ["a", "b", "c", "d"]
    masks = {lang: np.vstack([np.ones(6), rng.integers(0, 2, 6), np.ones(6)]) for lang in langs}
    per_layer = mask_cosine_per_layer(masks, langs)
    # layer 1's cosines written out by hand
    layer1 = np.array([[masks[x][1] @ masks[y][1] / np.linalg.norm(masks[x][1]) / np.linalg.norm(masks[y][1])
                        for y in langs] for x in langs])
    np.testing.assert_allclose(per_layer[1], layer1)
    influence = 20 * layer1 + 1  # influence follows layer 1 only
    corr = per_layer_correlations(per_layer, influence, langs)
    assert np.isnan(corr[0].pearson_r) and np.isnan(corr[2].pearson_r)  # identical layers: undefined
    np.testing.assert_allclose(corr[1].pearson_r, 1.0)


def test_specialisation_vs_accuracy_pairs_points():
    pts = [
        SpecialisationPoint(lang, e, 10.0 * e + i, 90.0 - 2 * e - i, 5)
        for i, lang in enumerate("xy")
        for e in range(3)
    ]
    c = specialisation_vs_accuracy(pts)
    r, _ = _pearson_by_hand([p.specialisation for p in pts], [p.accuracy for p in pts])
    np.testing.assert_allclose(c.pearson_r, r)
    assert c.pearson_r < -0.9 and c.n == 6
