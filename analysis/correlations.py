"""Correlations behind the paper's Figs 7, 8, 9 and 16, with Pearson and Spearman coefficients and p-values.

- specialisation (in-language share of the positive top-m) vs accuracy, one point per language × checkpoint;
- mask similarity (cosine of flattened 0/1 head masks) vs positive cross-language influence, one point per
  ordered language pair (test a, train b, a ≠ b), over the whole model and per layer;
- head overlap (% of a's enabled heads also enabled in b) vs negative cross-language influence.

The mask similarities themselves come from ``mask_stats.py`` (computed from the masks, not read from the
subnetwork stage's files); this module only correlates matrices of them with influence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass
class Correlation:
    """Pearson and Spearman coefficients with two-sided p-values, and the least-squares line y = slope·x + intercept.

    NaN where fewer than 3 points or an input is constant (a coefficient is undefined then).
    """

    n: int
    pearson_r: float
    pearson_p: float
    spearman_r: float
    spearman_p: float
    slope: float
    intercept: float

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if not np.isfinite(self.pearson_r):
            return f"n={self.n}: correlation undefined (fewer than 3 points or a constant variable)"
        return (
            f"Pearson r={self.pearson_r:.2f} (p={self.pearson_p:.3g}), "
            f"Spearman ρ={self.spearman_r:.2f} (p={self.spearman_p:.3g}), n={self.n}"
        )


def correlate(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson and Spearman correlation of paired finite values (pairs with a NaN are dropped)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, found {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, nan, nan, nan, nan, nan, nan)
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    return Correlation(
        n,
        float(pr.statistic),
        float(pr.pvalue),
        float(sr.statistic),
        float(sr.pvalue),
        float(slope),
        float(intercept),
    )


@dataclass
class PairPoints:
    """One point per ordered language pair (test language a, train language b, a ≠ b)."""

    test_lang: list[str]
    train_lang: list[str]
    x: np.ndarray
    y: np.ndarray
    correlation: Correlation

    def rows(self, x_name: str, y_name: str) -> list[dict]:
        return [
            {"test_lang": a, "train_lang": b, x_name: float(x), y_name: float(y)}
            for a, b, x, y in zip(self.test_lang, self.train_lang, self.x, self.y)
        ]


def cross_language_points(
    similarity: np.ndarray, influence: np.ndarray, languages: Sequence[str]
) -> PairPoints:
    """Pair off-diagonal cells of a similarity matrix and an influence matrix (rows: test, columns: train)
    and correlate them; cells with NaN (e.g. a test language without examples) are skipped."""
    similarity = np.asarray(similarity, dtype=np.float64)
    influence = np.asarray(influence, dtype=np.float64)
    n = len(languages)
    if similarity.shape != (n, n) or influence.shape != (n, n):
        raise ValueError(f"expected ({n}, {n}) matrices, found {similarity.shape} and {influence.shape}")
    a_list, b_list, xs, ys = [], [], [], []
    for i in range(n):
        for j in range(n):
            if i == j or not (np.isfinite(similarity[i, j]) and np.isfinite(influence[i, j])):
                continue
            a_list.append(languages[i])
            b_list.append(languages[j])
            xs.append(similarity[i, j])
            ys.append(influence[i, j])
    x, y = np.array(xs), np.array(ys)
    return PairPoints(a_list, b_list, x, y, correlate(x, y))


def per_layer_correlations(per_layer_similarity: np.ndarray, influence: np.ndarray,
                           languages: Sequence[str]) -> list[Correlation]:
    """Fig 9: for each layer, correlate that layer's (N, N) mask similarity (``per_layer_similarity``: L × N × N,
    e.g. ``mask_stats.mask_cosine_per_layer``) with cross-language influence over pairs."""
    return [cross_language_points(sim, influence, languages).correlation for sim in per_layer_similarity]


@dataclass
class SpecialisationPoint:
    """One language at one checkpoint: its in-language share of the positive top-m and its accuracy."""

    lang: str
    epoch: int
    specialisation: float
    accuracy: float
    n_examples: int


def specialisation_vs_accuracy(points: Sequence[SpecialisationPoint]) -> Correlation:
    """Fig 7: correlation of in-language reliance with accuracy over languages × checkpoints."""
    return correlate([p.specialisation for p in points], [p.accuracy for p in points])
