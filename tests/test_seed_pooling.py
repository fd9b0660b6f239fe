"""The two-level bootstrap over training seeds: what it may call a finding, and its spread against
known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.bootstrap import bootstrap_group_means
from analysis.seed_pooling import SeedSample, pool_seeds

LANGS = ["en", "fr", "de"]


def seed_sample(rng: np.random.Generator, seed: int, effects, n: int = 60, noise: float = 4.0) -> SeedSample:
    """Per-example values around a per-language effect (one entry per language)."""
    groups = np.repeat(np.arange(len(effects)), n)
    values = np.asarray(effects, dtype=float)[groups] + rng.normal(0, noise, groups.size)
    return SeedSample(seed, values, groups)


def test_opposite_seed_effects_are_not_a_finding_although_each_seed_is_significant():
    rng = np.random.default_rng(11)
    samples = [seed_sample(rng, 0, [6, 6, 6]), seed_sample(rng, 1, [6, 6, 6]), seed_sample(rng, 2, [-6, -6, -6])]
    pooled = pool_seeds(samples, LANGS, 2000, rng_seed=5)
    assert ((pooled.per_seed_low > 0) | (pooled.per_seed_high < 0)).all(), "each seed alone excludes zero"
    assert not pooled.marked(0.0).any(), (pooled.low, pooled.high)
    assert (pooled.agree() == 2).all()


def test_an_effect_every_seed_shows_is_a_finding_and_a_larger_margin_can_unmark_it():
    rng = np.random.default_rng(12)
    samples = [seed_sample(rng, s, [5, 4, 6]) for s in range(3)]
    pooled = pool_seeds(samples, LANGS, 2000, rng_seed=6)
    assert pooled.marked(0.5).all() and (pooled.agree() == 3).all()
    assert not pooled.marked(float(pooled.high.max()) + 1).any()


def test_pooled_estimate_weighs_seeds_equally_whatever_their_sizes():
    rng = np.random.default_rng(13)
    samples = [seed_sample(rng, 0, [1, 2, 3], n=200), seed_sample(rng, 1, [4, 0, 1], n=7)]
    pooled = pool_seeds(samples, LANGS, 200, rng_seed=1)
    by_seed = np.array([[s.values[s.groups == g].mean() for g in range(3)] for s in samples])
    np.testing.assert_allclose(pooled.per_seed[:, :3], by_seed)
    np.testing.assert_allclose(pooled.per_seed[:, 3], by_seed.mean(axis=1))
    np.testing.assert_allclose(pooled.pooled, np.r_[by_seed.mean(axis=0), by_seed.mean()])
    np.testing.assert_array_equal(pooled.n_examples[:, :3], [[200] * 3, [7] * 3])


def test_one_seed_gives_the_ordinary_stratified_bootstrap_interval():
    """Same distribution as bootstrap_group_means (other random stream): the intervals agree to
    resampling noise, and match the normal approximation of a mean's spread."""
    rng = np.random.default_rng(14)
    sample = seed_sample(rng, 0, [2, -1, 0], n=400, noise=5.0)
    pooled = pool_seeds([sample], LANGS, 4000, rng_seed=2)
    _, low, high = bootstrap_group_means(sample.values, sample.groups, 3, 4000, seed=3)
    np.testing.assert_allclose(pooled.low[:3], low[:, 0], atol=0.12)
    np.testing.assert_allclose(pooled.high[:3], high[:, 0], atol=0.12)
    half = 1.96 * 5.0 / np.sqrt(400)
    np.testing.assert_allclose((pooled.high[:3] - pooled.low[:3]) / 2, half, rtol=0.12)
    np.testing.assert_allclose(pooled.per_seed_low[0], pooled.low, atol=0.12)


def test_spread_covers_seed_and_test_sample_variance():
    """Many seeds whose effects vary (sd tau) each measured on n noisy examples (sd sigma): the pooled
    interval's half-width is 1.96 * sqrt((tau^2 + sigma^2 / n) / S), up to the bootstrap's (S-1)/S."""
    rng = np.random.default_rng(15)
    tau, sigma, n, seeds = 2.0, 6.0, 50, 60
    effects = rng.normal(1.0, tau, seeds)
    samples = [SeedSample(s, effects[s] + rng.normal(0, sigma, n), np.zeros(n, dtype=int)) for s in range(seeds)]
    pooled = pool_seeds(samples, ["x"], 3000, rng_seed=4)
    expected = 1.96 * np.sqrt((tau**2 + sigma**2 / n) / seeds * (seeds - 1) / seeds)
    measured = (pooled.high[0] - pooled.low[0]) / 2
    assert measured == pytest.approx(expected, rel=0.25)
    # a bootstrap over examples alone would be far narrower: it cannot see the seeds
    only_examples = 1.96 * sigma / np.sqrt(n * seeds)
    assert measured > 1.8 * only_examples


def test_a_language_missing_in_one_seed_is_left_out_of_that_seed_only():
    rng = np.random.default_rng(16)
    a = seed_sample(rng, 0, [3, 3, 3])
    b = seed_sample(rng, 1, [3, 3, 3])
    keep = b.groups != 2
    b = SeedSample(1, b.values[keep], b.groups[keep])
    pooled = pool_seeds([a, b], LANGS, 300, rng_seed=0)
    assert np.isnan(pooled.per_seed[1, 2]) and np.isfinite(pooled.pooled).all()
    assert pooled.pooled[2] == pytest.approx(a.values[a.groups == 2].mean())


def test_same_seed_same_interval_and_bad_input_is_refused():
    rng = np.random.default_rng(17)
    samples = [seed_sample(rng, s, [1, 0, -1]) for s in range(2)]
    one, two = pool_seeds(samples, LANGS, 300, rng_seed=9), pool_seeds(samples, LANGS, 300, rng_seed=9)
    np.testing.assert_array_equal(one.low, two.low)
    with pytest.raises(ValueError, match="each seed once"):
        pool_seeds([samples[0], samples[0]], LANGS)
    with pytest.raises(ValueError, match="group codes"):
        pool_seeds([SeedSample(0, np.ones(3), np.array([0, 1, 5]))], LANGS)
    with pytest.raises(ValueError, match="at least one"):
        pool_seeds([], LANGS)
