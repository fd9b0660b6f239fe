"""Bootstrap CIs: nominal coverage on a known distribution, stratification, pairing, determinism."""

import numpy as np

from analysis.bootstrap import bootstrap_group_means, bootstrap_mean, excludes_zero, paired_difference


def test_ci_covers_true_mean_at_about_nominal_rate():
    rng = np.random.default_rng(123)
    true_mean, trials, hits = 1.5, 300, 0
    widths = []
    for t in range(trials):
        sample = rng.normal(true_mean, 2.0, size=60)
        mean, low, high = bootstrap_mean(sample, n_resamples=400, seed=t)
        assert low[0] <= mean[0] <= high[0]
        hits += low[0] <= true_mean <= high[0]
        widths.append(high[0] - low[0])
    coverage = hits / trials
    assert 0.90 <= coverage <= 0.985, coverage
    # the width is about 2 · 1.96 · σ/√n (a wrong scale would give the wrong coverage anyway)
    np.testing.assert_allclose(np.mean(widths), 2 * 1.96 * 2.0 / np.sqrt(60), rtol=0.1)


def test_group_means_are_stratified_and_cover_each_group():
    rng = np.random.default_rng(7)
    means = np.array([10.0, -3.0, 50.0])
    hits = np.zeros(3)
    trials = 150
    for t in range(trials):
        groups = np.repeat([0, 1, 2], [40, 25, 70])
        values = rng.exponential(1.0, size=(groups.size, 2)) * 4 + means[groups][:, None] - 4
        mean, low, high = bootstrap_group_means(values, groups, 4, n_resamples=300, seed=t)
        for g in range(3):
            np.testing.assert_allclose(mean[g], values[groups == g].mean(axis=0))
        assert np.isnan(mean[3]).all() and np.isnan(low[3]).all()  # empty group
        hits += (low[:3, 0] <= means) & (means <= high[:3, 0])
    coverage = hits / trials
    assert ((coverage >= 0.87) & (coverage <= 0.99)).all(), coverage


def test_paired_difference_is_narrower_than_unpaired_and_deterministic():
    rng = np.random.default_rng(0)
    base = rng.normal(30, 15, size=(200, 1))
    a = base + rng.normal(1.0, 1.0, size=base.shape)  # a small, consistent shift
    b = base
    groups = np.zeros(200, dtype=int)
    diff, low, high = paired_difference(a, b, groups, 1, n_resamples=500, seed=5)
    np.testing.assert_allclose(diff[0, 0], (a - b).mean())
    assert excludes_zero(low, high)[0, 0]
    _, la, ha = bootstrap_group_means(a, groups, 1, 500, 5)
    _, lb, hb = bootstrap_group_means(b, groups, 1, 500, 6)
    unpaired_width = np.sqrt((ha - la) ** 2 + (hb - lb) ** 2)[0, 0]
    assert (high - low)[0, 0] < unpaired_width / 5
    again = paired_difference(a, b, groups, 1, n_resamples=500, seed=5)
    np.testing.assert_array_equal(again[1], low)
    other = paired_difference(a, b, groups, 1, n_resamples=500, seed=6)
    assert not np.array_equal(other[1], low)


def test_excludes_zero():
    np.testing.assert_array_equal(
        excludes_zero(np.array([-1.0, 0.5, -3.0]), np.array([1.0, 2.0, -0.1])), [False, True, True]
    )
