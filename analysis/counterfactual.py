"""The counterfactual check of the language-influence matrix: what fine-tuning again without one
training language does to each test language's loss, against what first-order TracIn says it does.

Retraining is the ground truth attribution approximates. At the level the study speaks of, whole
training languages, it costs one fit per language, plus a control that leaves out as many examples
drawn at random from every language, so that what is left is the effect of *which* examples were
removed, not of training on fewer. Both sides are per test example, so every cell gets a bootstrap
interval over test examples (paired: the same example under both models), pooled over training
seeds with the two-level bootstrap of ``seed_pooling``.

TracIn's prediction of removing a set S on test example z is the loss the training steps on S took
off z: Σ_e (η_e / B_e) Σ_{x∈S} g_x(θ_e) · g_z(θ_e) (a step of size η on a batch of B lowers z's loss by
about η/B · g_x·g_z for each x in it; Adam's preconditioning is ignored, as TracIn ignores it). The
sum over S is estimated from the analysis's sketched pool: each language's mean pool gradient
times the number of S's examples of that language (the pool is a uniform sample of each language's
training items, so this is unbiased for the whole of S). numpy only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .accuracy_stats import majority_rate
from .atomic import atomic_write
from .correlations import correlate
from .layout import removed_run_name
from .masks import name_seed
from .seed_pooling import PooledEffect, SeedSample, pool_seeds

CONTROL = "random"  # the data module's leave_out value of the control run
QUANTITIES = ("retrained", "predicted", "excess", "accuracy")


class CounterfactualError(ValueError):
    """Inputs of the counterfactual check that do not fit together; the message names the file or key."""


@dataclass(frozen=True)
class TestLosses:
    """One model's loss and correctness on every test example, in test-index order."""

    languages: list[str]
    test_index: np.ndarray  # (N,) int64
    lang: np.ndarray  # (N,) language codes
    loss: np.ndarray  # (N,) float64 cross-entropy
    correct: np.ndarray  # (N,) bool
    model_fingerprint: str


def write_test_losses(path: str | Path, losses: TestLosses) -> Path:
    """``.npz`` of plain arrays, written to a temporary name and renamed (a reader never sees half of it)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        np.savez(f, test_index=losses.test_index.astype(np.int64), lang=losses.lang.astype(np.int64),
                 languages=np.array(losses.languages, dtype=np.str_), loss=losses.loss.astype(np.float64),
                 correct=losses.correct.astype(bool), model_fingerprint=np.array(losses.model_fingerprint))
    return path


def load_test_losses(path: str | Path) -> TestLosses:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"test_index", "lang", "languages", "loss", "correct", "model_fingerprint"} - set(f.files)
            if missing:
                raise CounterfactualError(f"{path}: missing array(s) {sorted(missing)}")
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        if isinstance(err, CounterfactualError):
            raise
        raise CounterfactualError(f"{path}: not a readable test-loss file ({err})") from None
    n = arrays["test_index"].shape[0]
    for key in ("lang", "loss", "correct"):
        if arrays[key].shape != (n,):
            raise CounterfactualError(f"{path}: array {key!r} has shape {arrays[key].shape}, expected ({n},)")
    return TestLosses([str(x) for x in arrays["languages"]], arrays["test_index"], arrays["lang"],
                      arrays["loss"].astype(np.float64), arrays["correct"].astype(bool),
                      str(arrays["model_fingerprint"]))


def check_same_examples(reference: TestLosses, other: TestLosses, where: str) -> None:
    """Paired comparisons need the same test examples in the same order, in the same languages."""
    if reference.languages != other.languages:
        raise CounterfactualError(f"{where}: languages {other.languages}, the full run has {reference.languages}")
    if not (np.array_equal(reference.test_index, other.test_index) and np.array_equal(reference.lang, other.lang)):
        raise CounterfactualError(f"{where}: evaluated on other test examples than the full run "
                                  f"({other.test_index.size} vs {reference.test_index.size})")


def checkpoint_weights(sketched: Sequence[int], rates: Mapping[int, float],
                       examples_per_step: Mapping[int, float]) -> dict[int, float]:
    """η/B per sketched checkpoint, summed over the epochs it stands for.

    TracIn reads gradients at checkpoints only; a sketched checkpoint stands for every epoch after the
    previous sketched one up to its own (the first, from the start of training). With every epoch
    sketched this is each epoch's own mean rate over its batch size.

    Args:
        sketched: epochs whose checkpoints were sketched (ascending, distinct).
        rates: every trained epoch's mean learning rate (from its checkpoint).
        examples_per_step: every trained epoch's mean examples per optimizer step.
    """
    epochs = sorted(rates)
    if list(sketched) != sorted(set(sketched)) or not sketched:
        raise CounterfactualError(f"sketched epochs must be ascending and distinct, found {list(sketched)}")
    missing = [e for e in sketched if e not in rates]
    if missing:
        raise CounterfactualError(f"no learning rate recorded for sketched epoch(s) {missing} (epochs with one: {epochs})")
    weights, start = {}, min(epochs)
    for epoch in sketched:
        covered = [e for e in epochs if start <= e <= epoch]
        weights[epoch] = float(sum(rates[e] / examples_per_step[e] for e in covered))
        start = epoch + 1
    return weights


def interval_weights(records: Sequence[Mapping]) -> list[float]:
    """η/B for each of these checkpoints (their metadata, in training order): the sum of the rates of the
    optimizer steps since the previous listed checkpoint (the first, since training began) over an epoch's
    examples.

    Each example is visited once per epoch, so an interval of s steps visits about s/S of the epoch's
    examples, each with the interval's rates: Σ η over the interval / (B · S). For epoch checkpoints this is
    ``checkpoint_weights``; for checkpoints inside an epoch it splits the epoch's weight among them.

    Args:
        records: the checkpoints' ``crossling`` metadata, each with ``rate_sum`` (every rate since training
            began), ``examples_per_step`` and ``epoch_steps`` (recorded since crossling saves checkpoints
            inside an epoch).
    """
    missing = [i for i, r in enumerate(records)
               if any(r.get(k) is None for k in ("rate_sum", "examples_per_step", "epoch_steps"))]
    if missing or not records:
        raise CounterfactualError(f"checkpoint(s) {missing} record no rate_sum / examples_per_step / epoch_steps "
                                  "(written before crossling recorded them; use checkpoint_weights)")
    sums = [float(r["rate_sum"]) for r in records]
    if sums != sorted(sums):
        raise CounterfactualError(f"checkpoints out of training order (rate sums {sums})")
    previous, weights = 0.0, []
    for record, total in zip(records, sums):
        weights.append((total - previous) / (float(record["examples_per_step"]) * int(record["epoch_steps"])))
        previous = total
    return weights


def language_mean_gradients(pool: np.ndarray, pool_lang: np.ndarray, n_languages: int, where: str) -> np.ndarray:
    """(L, d) mean sketch of each language's pooled training examples (NaN rows for a language without any)."""
    pool = np.asarray(pool, dtype=np.float64)
    means = np.full((n_languages, pool.shape[1]), np.nan)
    for code in range(n_languages):
        rows = pool[pool_lang == code]
        if rows.size:
            means[code] = rows.mean(axis=0)
    return means


def score_removal_effects(scores: np.ndarray, pool_lang: np.ndarray, n_languages: int,
                          counts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(per removed set, each test row's) Σ_ℓ c_ℓ · (mean score of the pool items of language ℓ): the removal
    effect an attribution method's (test × pool) scores imply, the pool standing for the whole training
    split as in ``removal_prediction``; positive where the removed examples helped (a step on them lowered
    the test loss). In the method's own units."""
    scores = np.asarray(scores, dtype=np.float64)
    means = np.full((scores.shape[0], n_languages), np.nan)
    for code in range(n_languages):
        if (pool_lang == code).any():
            means[:, code] = scores[:, pool_lang == code].mean(axis=1)
    return {r: np.nansum(means * np.asarray(c, dtype=np.float64)[None, :], axis=1) for r, c in counts.items()}


def removal_prediction(test: np.ndarray, means: np.ndarray, removed_counts: np.ndarray, weight: float) -> np.ndarray:
    """(N,) first-order change of each test example's loss when the removed examples are not trained on,
    at one checkpoint: ``weight`` · g_z · Σ_ℓ c_ℓ m_ℓ (``m_ℓ`` language ℓ's mean pool gradient, ``c_ℓ``
    removed examples of ℓ). Positive: removing them raises the loss (they helped)."""
    counts = np.asarray(removed_counts, dtype=np.float64)
    used = counts > 0
    if np.isnan(means[used]).any():
        raise CounterfactualError("removed examples of a language that has no sketched pool examples: "
                                  f"counts {counts.tolist()}")
    direction = (counts[used, None] * means[used]).sum(axis=0)
    return weight * (np.asarray(test, dtype=np.float64) @ direction)


@dataclass(frozen=True)
class SeedCounterfactual:
    """One training seed's per-test-example values, one entry per removed set (languages, then ``random``).

    ``retrained[r]`` is loss without r − loss with everything; ``predicted[r]`` TracIn's estimate of it;
    ``accuracy[r]`` correct without r − correct with everything (in points)."""

    seed: int
    languages: list[str]
    lang: np.ndarray
    retrained: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    not_learned: tuple[str, ...] = ()  # removed sets whose fit does not beat the majority class (did_not_learn)
    # refit name -> loss of a fit with nothing removed (another batch order and dropout) minus the full run's,
    # per test example: how far retraining moves a test loss when the data do not change at all
    refits: dict[str, np.ndarray] = field(default_factory=dict)

    def excess(self, removed: str) -> np.ndarray:
        """The retraining effect beyond the control's: what *which* examples were removed did."""
        return self.retrained[removed] - self.retrained[CONTROL]


def did_not_learn(losses: TestLosses, labels: np.ndarray) -> bool:
    """Whether a model's test accuracy is at or below the majority-class rate in every test language.

    Why: fine-tuning a small encoder at the demo's learning rate sometimes never leaves the majority class
    (e5 demo, 1,998 pairs a language: the fits without en and without fr). Such a fit's test loss rises for
    every language alike; counted as the removed language's effect, it would be the largest effect of all.
    ``labels`` are the test labels in ``losses``' order."""
    majority = majority_rate(labels, losses.lang, len(losses.languages))
    present = np.flatnonzero(np.isfinite(majority))  # languages with test examples
    return present.size > 0 and all(losses.correct[losses.lang == g].mean() <= majority[g] for g in present)


def dev_did_not_learn(metrics_csv: Path, languages: Sequence[str]) -> bool | None:
    """Whether a fit's last validation stayed at or below the majority-class rate in every language, from
    its ``logs/metrics.csv`` (``val/acc_<lang>``, ``val/majority_<lang>``); None when the log holds no
    validation of every language (then the test split decides, see ``did_not_learn``).

    Why dev: whether a fit learned decides which cells the check compares, so deciding it on the test
    examples the check then measures would select on them."""
    import csv

    try:
        with open(metrics_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    keys = [(f"val/acc_{lang}", f"val/majority_{lang}") for lang in languages]
    last = next((row for row in reversed(rows) if all(row.get(a) and row.get(m) for a, m in keys)), None)
    if last is None:
        return None
    return all(float(last[a]) <= float(last[m]) for a, m in keys)


def per_example_effects(full: TestLosses, without: Mapping[str, TestLosses]) -> tuple[dict, dict]:
    """(Δloss, Δcorrect in points) per removed set, per test example, checked to be the same examples."""
    losses, accuracy = {}, {}
    for removed, run in without.items():
        check_same_examples(full, run, removed_run_name(removed))
        losses[removed] = run.loss - full.loss
        accuracy[removed] = 100.0 * (run.correct.astype(np.float64) - full.correct.astype(np.float64))
    return losses, accuracy


@dataclass(frozen=True)
class CounterfactualMatrix:
    """Per quantity (``retrained``, ``predicted``, ``excess``, ``accuracy``) and removed set, the pooled
    effect per test language; ``removed`` lists the languages left out, then ``random``."""

    languages: list[str]
    removed: list[str]
    effects: dict[str, dict[str, PooledEffect]]
    not_learned: tuple[str, ...] = ()  # removed sets whose fit did not learn in some seed: kept out of the agreement

    def cell(self, quantity: str, test_lang: str, removed: str) -> tuple[float, float, float]:
        effect = self.effects[quantity][removed]
        g = effect.groups.index(test_lang)
        return float(effect.pooled[g]), float(effect.low[g]), float(effect.high[g])

    def grid(self, quantity: str, removed: Sequence[str] | None = None) -> np.ndarray:
        """(test languages, removed sets) pooled estimates; ``removed`` None: every removed set (an empty
        list is no column, e.g. when every leave-out fit failed, never all of them)."""
        removed = list(self.removed if removed is None else removed)
        return np.array([[self.cell(quantity, t, r)[0] for r in removed] for t in self.languages])


def counterfactual_matrix(seeds: Sequence[SeedCounterfactual], n_resamples: int = 1000) -> CounterfactualMatrix:
    """Pool every quantity over seeds (one seed: the ordinary stratified bootstrap over test examples)."""
    if not seeds:
        raise CounterfactualError("the counterfactual matrix needs at least one seed's results")
    languages = seeds[0].languages
    removed = [r for r in seeds[0].retrained if r != CONTROL] + [CONTROL]
    for s in seeds:
        if s.languages != languages or sorted(s.retrained) != sorted(removed):
            raise CounterfactualError(f"seed {s.seed}: languages {s.languages} and removed sets {sorted(s.retrained)} "
                                      f"differ from seed {seeds[0].seed}'s {languages}, {sorted(removed)}")
    effects: dict[str, dict[str, PooledEffect]] = {q: {} for q in QUANTITIES}
    for quantity in QUANTITIES:
        for r in removed:
            if quantity == "excess" and r == CONTROL:
                continue

            def values(s: SeedCounterfactual, r=r, quantity=quantity) -> np.ndarray:
                return s.excess(r) if quantity == "excess" else getattr(s, quantity)[r]

            samples = [SeedSample(s.seed, values(s), np.asarray(s.lang)) for s in seeds]
            effects[quantity][r] = pool_seeds(samples, languages, n_resamples, name_seed("counterfactual", quantity, r))
    failed = {r for s in seeds for r in s.not_learned}
    return CounterfactualMatrix(list(languages), removed, effects, tuple(r for r in removed if r in failed))


def noise_floor(seeds: Sequence[SeedCounterfactual]) -> dict[str, list[float]]:
    """Per test language, each refit's change of its mean test loss (averaged over the seeds that ran that
    refit, as the retrained matrix averages over seeds): the null distribution of a retrained cell."""
    if not seeds:
        return {}
    languages = seeds[0].languages
    names = sorted({name for s in seeds for name in s.refits})
    floor: dict[str, list[float]] = {t: [] for t in languages}
    for name in names:
        having = [s for s in seeds if name in s.refits]
        for g, t in enumerate(languages):
            floor[t].append(float(np.mean([s.refits[name][s.lang == g].mean() for s in having])))
    return floor if names else {}


def sign_chance(predicted: np.ndarray, retrained: np.ndarray) -> float:
    """The share of cells whose signs would agree if the two matrices' signs were independent, each keeping
    its own share of positive cells: what "the same sign in x % of cells" must beat."""
    both = np.isfinite(predicted) & np.isfinite(retrained)
    if not both.any():
        return float("nan")
    p, r = np.mean(predicted[both] > 0), np.mean(retrained[both] > 0)
    return float(p * r + (1 - p) * (1 - r))


def column_permutation_p(predicted: np.ndarray, retrained: np.ndarray) -> float:
    """One-sided p-value of the cells' Pearson r when the removed sets (columns) are exchanged between the two
    matrices: each column of the retrained matrix is one fit, so its cells share that fit's noise and a test
    over cells as if independent overstates the evidence. Exact over every permutation (L! for L columns)."""
    columns = predicted.shape[1]
    if columns < 2:
        return float("nan")
    observed = correlate(predicted.ravel(), retrained.ravel()).pearson_r
    if not np.isfinite(observed):
        return float("nan")
    null = [correlate(predicted[:, list(order)].ravel(), retrained.ravel()).pearson_r
            for order in itertools.permutations(range(columns))]
    return float(np.mean(np.asarray(null) >= observed - 1e-12))


def calibration_slope(predicted: np.ndarray, retrained: np.ndarray) -> float:
    """Least-squares slope of predicted on retrained over the cells: 1 when the prediction has retraining's
    scale, near 0 when it is far too small (a correlation alone cannot tell)."""
    return correlate(np.ravel(retrained), np.ravel(predicted)).slope


def cell_agreement(predicted: np.ndarray, retrained: np.ndarray) -> dict:
    """Predicted against retrained over (test language, removed set) cells: Pearson and Spearman with their
    p-values as if cells were independent, the column-permutation p that respects the shared fits, the
    calibration slope, and the number of cells compared."""
    overall = correlate(predicted.ravel(), retrained.ravel())
    return {"pearson_r": overall.pearson_r, "pearson_p": overall.pearson_p,
            "spearman_r": overall.spearman_r, "spearman_p": overall.spearman_p, "n": overall.n,
            "permutation_p": column_permutation_p(predicted, retrained),
            "slope": calibration_slope(predicted, retrained)}


def language_grid(seed: SeedCounterfactual, values: Mapping[str, np.ndarray], removed: Sequence[str]) -> np.ndarray:
    """(test languages, removed sets) mean of per-example ``values`` over each test language's examples."""
    return np.array([[float(values[r][seed.lang == g].mean()) for r in removed] for g in range(len(seed.languages))])


def checkpoint_agreement(seed: SeedCounterfactual, by_checkpoints: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """Agreement of TracIn's prediction from the last n checkpoints with retraining, per n: Pearson r, its
    column-permutation p, Spearman ρ and the calibration slope over the leave-out cells of one seed (the
    point estimates; the intervals belong to the prediction over every checkpoint)."""
    left_out = [r for r in seed.retrained if r != CONTROL and r not in seed.not_learned]
    retrained = language_grid(seed, seed.retrained, left_out)
    return {str(n): cell_agreement(language_grid(seed, values, left_out), retrained)
            for n, values in sorted(by_checkpoints.items())}


@dataclass(frozen=True)
class Agreement:
    """How far TracIn's prediction and shares say what retraining says, over the L×L language cells.

    Attributes:
        rank_by_test_language: Spearman ρ, per test language, over the training languages left out.
        cells: Pearson and Spearman of predicted vs retrained over all cells.
        sign_agreement: share of cells whose predicted and retrained effects have the same sign.
        own_largest_retrained / own_largest_predicted / own_largest_share: per test language, whether
            its own language is the training language whose removal hurts most (retrained, predicted) and
            whose share of the top-m sets is largest (None without shares).
        above_control: cells whose excess over the control has an interval above zero, of ``n_cells``.
        excluded: removed sets kept out of every number above because their fit did not learn (a failed
            control leaves nothing to compare with: no cell is then counted above or below it).
        sign_chance: the share of cells agreeing in sign that independent signs would give.
        noise_floor: per test language, the largest absolute change of mean test loss among the refits (fits
            with nothing removed); empty without refits.
        beyond_noise: cells whose retrained change exceeds their test language's noise floor (None without
            refits); ``control_beyond_noise`` the same for the random control's cells.
    """

    rank_by_test_language: dict[str, float]
    cells: dict
    sign_agreement: float
    own_largest_retrained: dict[str, bool]
    own_largest_predicted: dict[str, bool]
    own_largest_share: dict[str, bool] | None
    above_control: int
    below_control: int
    n_cells: int
    excluded: tuple[str, ...] = ()
    sign_chance: float = float("nan")
    noise_floor: dict[str, float] = field(default_factory=dict)
    n_refits: int = 0
    beyond_noise: int | None = None
    control_beyond_noise: int | None = None

    def as_dict(self) -> dict:
        return {
            "rank_by_test_language": self.rank_by_test_language,
            "cells": self.cells,
            "sign_agreement": self.sign_agreement,
            "own_largest_retrained": self.own_largest_retrained,
            "own_largest_predicted": self.own_largest_predicted,
            "own_largest_share": self.own_largest_share,
            "above_control": self.above_control,
            "below_control": self.below_control,
            "n_cells": self.n_cells,
            "excluded": list(self.excluded),
            "sign_chance": self.sign_chance,
            "noise_floor": self.noise_floor,
            "n_refits": self.n_refits,
            "beyond_noise": self.beyond_noise,
            "control_beyond_noise": self.control_beyond_noise,
        }


def measure_agreement(matrix: CounterfactualMatrix, shares: np.ndarray | None = None,
                      floor: Mapping[str, Sequence[float]] | None = None) -> Agreement:
    """Agreement numbers of the pooled matrix; ``shares`` is the (test, train) language share matrix of
    the top-m sets (the report's, positive sign) in ``matrix.languages`` order, or None; ``floor`` the
    refits' changes per test language (``noise_floor``), or None."""
    languages = matrix.languages
    left_out = [r for r in matrix.removed if r != CONTROL and r not in matrix.not_learned]
    retrained, predicted = matrix.grid("retrained", left_out), matrix.grid("predicted", left_out)
    ranks = {t: correlate(predicted[i], retrained[i]).spearman_r for i, t in enumerate(languages)}
    both = np.isfinite(predicted) & np.isfinite(retrained)
    signs = float(np.mean(np.sign(predicted[both]) == np.sign(retrained[both]))) if both.any() else float("nan")

    def own_largest(grid: np.ndarray, columns: Sequence[str]) -> dict[str, bool]:
        out = {}
        for i, t in enumerate(languages):
            if t in columns and np.isfinite(grid[i]).any():
                out[t] = bool(columns[int(np.nanargmax(grid[i]))] == t)
        return out

    above = below = 0
    if CONTROL not in matrix.not_learned:  # a control that did not learn measures nothing to exceed
        for t in languages:
            for r in left_out:
                _, low, high = matrix.cell("excess", t, r)
                above += int(low > 0)
                below += int(high < 0)
    cells = cell_agreement(predicted, retrained)
    largest = {t: float(np.max(np.abs(v))) for t, v in (floor or {}).items() if len(v)}
    beyond = control_beyond = None
    if largest:
        beyond = sum(int(abs(matrix.cell("retrained", t, r)[0]) > largest[t]) for t in languages for r in left_out)
        control_beyond = sum(int(abs(matrix.cell("retrained", t, CONTROL)[0]) > largest[t]) for t in languages)
    return Agreement(
        rank_by_test_language={t: float(v) for t, v in ranks.items()},
        cells=cells,
        sign_agreement=signs,
        own_largest_retrained=own_largest(retrained, left_out),
        own_largest_predicted=own_largest(predicted, left_out),
        own_largest_share=None if shares is None else own_largest(np.asarray(shares, dtype=np.float64), languages),
        above_control=above,
        below_control=below,
        n_cells=len(languages) * len(left_out),
        excluded=tuple(matrix.not_learned),
        sign_chance=sign_chance(predicted, retrained),
        noise_floor=largest,
        n_refits=max((len(v) for v in (floor or {}).values()), default=0),
        beyond_noise=beyond,
        control_beyond_noise=control_beyond,
    )


CSV_COLUMNS = ["test_lang", "removed", "quantity", "unit", "pooled", "ci_low", "ci_high", "seeds_agree", "n_seeds", "n_test"]
UNITS = {"retrained": "loss", "predicted": "loss", "excess": "loss", "accuracy": "points"}


def matrix_rows(matrix: CounterfactualMatrix) -> list[dict]:
    """``counterfactual.csv``'s rows: one per quantity × removed set × test language (and ``all``)."""
    rows = []
    for quantity, by_removed in matrix.effects.items():
        for removed, effect in by_removed.items():
            agree = effect.agree()
            for g, group in enumerate(effect.groups):
                rows.append({"test_lang": group, "removed": removed, "quantity": quantity, "unit": UNITS[quantity],
                             "pooled": float(effect.pooled[g]), "ci_low": float(effect.low[g]),
                             "ci_high": float(effect.high[g]), "seeds_agree": int(agree[g]),
                             "n_seeds": len(effect.seeds), "n_test": int(effect.n_examples[:, g].sum())})
    return rows


def permutation_words(p: float) -> str:
    """The column-permutation p in words; with one fit left out there is nothing to exchange."""
    if not np.isfinite(p):
        return "no permutation p: one fit left out, nothing to exchange"
    return f"permutation p = {p:.2f}, exchanging the fits left out"


def describe_agreement(agreement: Agreement, matrix: CounterfactualMatrix) -> str:
    """The study summary's sentence: what retraining confirms of TracIn's language matrix."""
    n_seeds = len(next(iter(matrix.effects["retrained"].values())).seeds)
    own_r = sum(agreement.own_largest_retrained.values())
    own_p = sum(agreement.own_largest_predicted.values())
    n = len(agreement.own_largest_retrained)
    cells = agreement.cells
    if agreement.n_cells == 0:
        return (f"Counterfactual check ({n_seeds} seed{'s' if n_seeds > 1 else ''}): no leave-out fit learned "
                f"({', '.join(f'without {r}' for r in agreement.excluded)} stayed at the majority class in every "
                "language), so it compares nothing: a fine-tuning that failed, not an effect of the data left out.")
    text = (
        f"Counterfactual check ({n_seeds} seed{'s' if n_seeds > 1 else ''}, one fit per training language left out "
        f"and a random control): over {agreement.n_cells} test × training-language cells, TracIn's predicted change "
        f"of test loss correlates with the retrained one at Pearson r = {cells['pearson_r']:.2f}, Spearman "
        f"ρ = {cells['spearman_r']:.2f} ({permutation_words(cells.get('permutation_p', float('nan')))}; predicted "
        f"per unit of retrained change, the slope: {cells.get('slope', float('nan')):.3g}), and has its sign in "
        f"{100 * agreement.sign_agreement:.0f} % of cells (independent signs: "
        f"{100 * agreement.sign_chance:.0f} %); "
        f"removing a test language's own training language hurts it most in {own_r} of {n} test languages "
        f"(retrained) and {own_p} of {n} (predicted)"
    )
    if agreement.own_largest_share is not None:
        shares = agreement.own_largest_share
        text += f", and its own language has the largest top-m share in {sum(shares.values())} of {len(shares)}"
    if CONTROL in agreement.excluded:
        text += "; the random control's fit did not learn, so no cell is compared with it"
    else:
        text += (f"; {agreement.above_control} of {agreement.n_cells} cells hurt more than leaving out as many random "
                 f"examples (interval above the control), {agreement.below_control} less")
    if agreement.beyond_noise is None:
        text += "; retraining's own noise is not measured (no refits with nothing removed: counterfactual_refits)"
    else:
        text += (f"; {agreement.beyond_noise} of {agreement.n_cells} cells (and {agreement.control_beyond_noise} of "
                 f"{len(agreement.noise_floor)} control cells) change test loss by more than any of "
                 f"{agreement.n_refits} refit{'s' if agreement.n_refits > 1 else ''} with nothing removed did (other "
                 f"batch order and dropout; up to {max(agreement.noise_floor.values()):.3f} in loss)")
    if agreement.excluded:
        names = ", ".join(f"without {r}" for r in agreement.excluded)
        seeds = " (in at least one seed)" if n_seeds > 1 else ""
        text += (f". Left out of these numbers: the fit{'s' if len(agreement.excluded) > 1 else ''} {names}, whose "
                 f"accuracy (on dev, where the fit logged it) does not beat the majority class in any language{seeds}: a fine-tuning that "
                 "failed, not an effect of the data left out")
    return text + "."
