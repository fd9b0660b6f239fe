"""Bootstrap confidence intervals over test examples.

Each cell of a contribution matrix is a mean over one test language's examples, so resampling is
stratified by test language: every resample draws, with replacement, as many examples of each
test language as there are. For a difference between two conditions on the same test examples
the per-example differences are resampled (a paired bootstrap), which is what makes small
but consistent changes detectable.

Resamples are drawn as multinomial counts (equivalent to drawing indices with replacement) so a
resample's mean is one matrix product; the RNG is seeded explicitly, never the global one.
"""

from __future__ import annotations

import numpy as np


def _check(values: np.ndarray, n_resamples: int, level: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected (n,) or (n, k) values, found shape {values.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, found {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), found {level}")
    return values


def resampled_means(
    values: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 256
) -> np.ndarray:
    """(n_resamples, k) means of ``values`` (n, k) over bootstrap resamples of its rows."""
    n = values.shape[0]
    out = np.empty((n_resamples, values.shape[1]))
    p = np.full(n, 1.0 / n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        counts = rng.multinomial(n, p, size=stop - start).astype(np.float64)
        out[start:stop] = counts @ values / n
    return out


def bootstrap_mean(
    values: np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``values`` over rows with percentile bootstrap CIs → (mean, low, high), each (k,).
    NaN where there are no rows."""
    values = _check(values, n_resamples, level)
    k = values.shape[1]
    if values.shape[0] == 0:
        nan = np.full(k, np.nan)
        return nan, nan.copy(), nan.copy()
    rng = np.random.default_rng(seed)
    means = resampled_means(values, n_resamples, rng)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return values.mean(axis=0), low, high


def bootstrap_group_means(
    values: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group means of ``values`` (n, k) with stratified percentile bootstrap CIs.

    Returns (mean, low, high), each (n_groups, k); rows of empty groups are NaN. Each group gets
    its own child seed so adding a group does not change the others' intervals.
    """
    values = _check(values, n_resamples, level)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (values.shape[0],):
        raise ValueError(f"groups must have shape ({values.shape[0]},), found {groups.shape}")
    k = values.shape[1]
    mean = np.full((n_groups, k), np.nan)
    low, high = mean.copy(), mean.copy()
    children = np.random.SeedSequence(seed).spawn(n_groups)
    for g in range(n_groups):
        rows = values[groups == g]
        if rows.shape[0] == 0:
            continue
        rng = np.random.default_rng(children[g])
        means = resampled_means(rows, n_resamples, rng)
        alpha = (1 - level) / 2
        low[g], high[g] = np.quantile(means, [alpha, 1 - alpha], axis=0)
        mean[g] = rows.mean(axis=0)
    return mean, low, high


def paired_difference(
    values_a: np.ndarray,
    values_b: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group mean of a − b with a paired bootstrap: rows of ``values_a`` and ``values_b`` are the
    same test examples, and the per-example differences are resampled together."""
    values_a = np.asarray(values_a, dtype=np.float64)
    values_b = np.asarray(values_b, dtype=np.float64)
    if values_a.shape != values_b.shape:
        raise ValueError(
            f"paired values must have the same shape, found {values_a.shape} and {values_b.shape}"
        )
    return bootstrap_group_means(values_a - values_b, groups, n_groups, n_resamples, seed, level)


def excludes_zero(low: np.ndarray, high: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Cells whose interval lies entirely on one side of zero, clear of it by more than ``margin``
    (the projection's measured error: a change inside it could be the sketch's, not the model's)."""
    low, high = np.asarray(low), np.asarray(high)
    return (low > margin) | (high < -margin)
