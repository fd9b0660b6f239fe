"""One answer across training seeds: a two-level (hierarchical) bootstrap of a per-example effect.

A study's change (say, the in-language share under the own subnetwork minus under the full model)
is measured on one fine-tuning run's test examples. Another run differs in its head initialisation,
dropout and batch order, and its estimate moves by more than the test-sample interval says. The
pooled estimate is the mean of the seeds' estimates (each seed weighs the same, whatever the number
of test examples its correct-by-all filter kept), and its interval resamples both levels: draw S
seeds with replacement from the S trained, then, within each drawn seed, its test examples with
replacement (stratified by test language). Its spread therefore holds the variance between seeds
(which already contains each seed's own test-sample noise) and adds the within-seed noise of the
seeds drawn; with one seed it is the ordinary stratified bootstrap.

Why this and not a t-interval over the seed means: with three seeds the t-interval leans on two
degrees of freedom (t = 4.30) and on normality of seed effects nobody has measured, while a
bootstrap that resampled only test examples would ignore the seed entirely. The two-level bootstrap
says what the runs we have support: with S seeds its 95 % interval spans roughly the range of the
seeds' estimates, widened by their test-sample noise, so a change is called a finding only when
it holds in every drawn combination of the runs — an effect of opposite sign in one seed of three
(drawn alone with probability 1/27 > 2.5 %) keeps zero inside it. It is not an inference about
the population of seeds: with three, none is possible (docs/methods.md, "Seed pooling: which interval, and why").

Resampling draws are seeded from names (``analysis.masks.name_seed``), never from the global RNG.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .bootstrap import resampled_means


@dataclass(frozen=True)
class SeedSample:
    """One training seed's per-example values of an effect and the test language of each example."""

    seed: int
    values: np.ndarray  # (n,)
    groups: np.ndarray  # (n,) test-language codes


@dataclass(frozen=True)
class PooledEffect:
    """Per group (test language) and over all groups (the last entry, ``ALL``): each seed's estimate
    with its within-seed interval, the pooled estimate with its two-level interval, and the number
    of seeds whose estimate has the pooled estimate's sign."""

    groups: list[str]  # group names; the last is "all" (mean over groups)
    seeds: list[int]
    per_seed: np.ndarray  # (S, G+1)
    per_seed_low: np.ndarray
    per_seed_high: np.ndarray
    pooled: np.ndarray  # (G+1,)
    low: np.ndarray
    high: np.ndarray
    n_examples: np.ndarray  # (S, G+1) examples per seed and group

    def agree(self) -> np.ndarray:
        """(G+1,) seeds whose estimate has the sign of the pooled estimate (a zero agrees with nothing)."""
        signs = np.sign(self.per_seed)
        return (signs == np.sign(self.pooled)[None, :]).sum(axis=0) * (np.sign(self.pooled) != 0)

    def marked(self, margin: float) -> np.ndarray:
        """(G+1,) pooled intervals that clear zero by more than ``margin`` (the projection error)."""
        return (self.low > margin) | (self.high < -margin)


ALL = "all"


def _quantiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        low, high = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
    return low, high


def pool_seeds(
    samples: list[SeedSample],
    group_names: list[str],
    n_resamples: int = 1000,
    rng_seed: int | np.random.SeedSequence = 0,
    level: float = 0.95,
) -> PooledEffect:
    """Each seed's and the pooled mean of an effect per group and over groups, with percentile
    intervals: within a seed the stratified bootstrap over its test examples, pooled the two-level
    bootstrap (seeds with replacement, then examples within each drawn seed).

    A group a seed has no examples of is left out of that seed's mean over groups, and out of the
    pooled mean of that group; a group no seed has is NaN.
    """
    if not samples:
        raise ValueError("pool_seeds needs at least one seed's sample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, found {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), found {level}")
    seeds = [s.seed for s in samples]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each seed once: found {seeds}")
    n_seeds, n_groups = len(samples), len(group_names)
    rng = np.random.default_rng(rng_seed)
    # within[s][g]: (n_resamples, S) resampled means of group g in seed s, one column per slot a drawn
    # seed can take, so that a seed drawn twice in one resample gets two independent resamples
    within = np.full((n_seeds, n_groups, n_resamples, n_seeds), np.nan)
    counts = np.zeros((n_seeds, n_groups + 1), dtype=np.int64)
    means = np.full((n_seeds, n_groups), np.nan)
    for s, sample in enumerate(samples):
        values = np.asarray(sample.values, dtype=np.float64)
        groups = np.asarray(sample.groups, dtype=np.int64)
        if values.shape != groups.shape or values.ndim != 1:
            raise ValueError(f"seed {sample.seed}: values and groups must be (n,) arrays of one length, found "
                             f"{values.shape} and {groups.shape}")
        if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
            raise ValueError(f"seed {sample.seed}: group codes must be in [0, {n_groups}), found {groups.min()}"
                             f"..{groups.max()}")
        for g in range(n_groups):
            rows = values[groups == g]
            counts[s, g] = rows.size
            if rows.size:
                means[s, g] = rows.mean()
                draws = resampled_means(rows[:, None], n_resamples * n_seeds, rng)[:, 0]
                within[s, g] = draws.reshape(n_resamples, n_seeds)
        counts[s, n_groups] = counts[s, :n_groups].sum()

    # nanmean of an all-NaN slice (a group no seed has) is NaN by design here: no warning
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_seed = np.concatenate([means, np.nanmean(means, axis=1, keepdims=True)], axis=1)
        # a seed's own interval: its first slot's resamples (stratified by group for the mean over groups)
        own = within[:, :, :, 0]  # (S, G, R)
        own_all = np.nanmean(own, axis=1)  # (S, R)
        per_low, per_high = np.empty_like(per_seed), np.empty_like(per_seed)
        for s in range(n_seeds):
            lo, hi = _quantiles(np.concatenate([own[s].T, own_all[s][:, None]], axis=1), level)
            per_low[s], per_high[s] = lo, hi
        drawn = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))  # (R, slots)
        slot = np.arange(n_seeds)[None, :]
        res = np.arange(n_resamples)[:, None]
        picked = within[drawn, :, res, slot]  # (R, slots, G)
        pooled_groups = np.nanmean(picked, axis=1)  # (R, G)
        pooled_all = np.nanmean(np.nanmean(picked, axis=2), axis=1)  # (R,)
        samples_pooled = np.concatenate([pooled_groups, pooled_all[:, None]], axis=1)
        low, high = _quantiles(samples_pooled, level)
        pooled = np.nanmean(per_seed, axis=0)
    return PooledEffect([*group_names, ALL], seeds, per_seed, per_low, per_high, pooled, low, high, counts)

