"""Table 2 with uncertainty: per-language test accuracy of each model column (full model, subnetworks
applied to the fully fine-tuned model, subnetworks after SFT) with bootstrap confidence intervals,
the majority-class rate each must beat, and paired differences between columns.

Input is ``<run>/accuracy/predictions.npz`` (written by lightning_modules/evaluation.py): one row per
test example, one bool ``correct_<column>`` array per model. All columns were evaluated on the same
examples, so differences are paired: the per-example differences are resampled, stratified by language.
Every interval uses the same seed, hence the same resampled examples, for all columns and differences.
numpy only; seeds come from names (``name_seed``), never the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bootstrap import bootstrap_group_means, paired_difference, resampled_means
from .masks import name_seed

REQUIRED_KEYS = ("test_index", "lang", "languages", "label")
COLUMN_PREFIX = "correct_"
COLUMNS = ("full_model", "subnetwork_after_full_ft", "subnetwork_after_sft")
# (a, b): a − b is reported when both columns are present
DIFFERENCES = (("subnetwork_after_sft", "full_model"), ("subnetwork_after_sft", "subnetwork_after_full_ft"))


class PredictionsError(ValueError):
    """A predictions file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Predictions:
    """Per-example test results of one SFT run; ``correct`` maps a column name (no prefix) to a bool array."""

    path: Path | None
    test_index: np.ndarray
    lang: np.ndarray
    languages: list[str]
    label: np.ndarray
    correct: dict[str, np.ndarray]

    @property
    def n_lang(self) -> int:
        return len(self.languages)

    def column(self, name: str) -> np.ndarray:
        """A column's correctness by name, with or without the ``correct_`` prefix."""
        key = name.removeprefix(COLUMN_PREFIX)
        if key not in self.correct:
            raise PredictionsError(f"{self.path or 'predictions'}: no column {name!r} (found {sorted(self.correct)})")
        return self.correct[key]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise PredictionsError(f"predictions file not found: {path} (written at the end of an SFT fit)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except ValueError as err:  # object arrays, or not an npz at all
        raise PredictionsError(f"{path}: not a plain-array .npz file ({err})") from None
    except (OSError, EOFError) as err:
        raise PredictionsError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def _check_arrays(path: Path, data: dict[str, np.ndarray]) -> None:
    """Shapes and ranges, so a bad file fails here with its name rather than later as a wrong number."""
    n = data["lang"].shape
    for key, arr in data.items():
        if key != "languages" and arr.shape != n:
            raise PredictionsError(f"{path}: key {key!r} has shape {arr.shape}, expected {n} like 'lang'")
    if data["languages"].ndim != 1 or data["languages"].dtype.kind != "U":
        raise PredictionsError(f"{path}: key 'languages' must be a 1-D array of str, found {data['languages'].dtype}")
    for key in ("test_index", "lang", "label"):
        if data[key].dtype.kind not in "iu":
            raise PredictionsError(f"{path}: key {key!r} must hold integers, found dtype {data[key].dtype}")
    if n[0] and (data["lang"].min() < 0 or data["lang"].max() >= len(data["languages"])):
        raise PredictionsError(f"{path}: key 'lang' has codes outside 0..{len(data['languages']) - 1}")
    if len(np.unique(data["test_index"])) != n[0]:
        raise PredictionsError(f"{path}: key 'test_index' repeats an example")
    for key in data:
        if key.startswith(COLUMN_PREFIX) and data[key].dtype != bool:
            raise PredictionsError(f"{path}: key {key!r} must be bool, found dtype {data[key].dtype}")


def load_predictions(path: str | Path) -> Predictions:
    """Read and check a ``predictions.npz``; a missing key or a malformed array is a PredictionsError
    that names the file and the key."""
    path = Path(path)
    data = _read_npz(path)
    for key in REQUIRED_KEYS:
        if key not in data:
            raise PredictionsError(f"{path}: missing key {key!r} (found {sorted(data)})")
    if not any(k.startswith(COLUMN_PREFIX) for k in data):
        raise PredictionsError(f"{path}: missing key '{COLUMN_PREFIX}<column>' (no model column; found {sorted(data)})")
    _check_arrays(path, data)
    correct = {k.removeprefix(COLUMN_PREFIX): v for k, v in data.items() if k.startswith(COLUMN_PREFIX)}
    return Predictions(path, data["test_index"], data["lang"].astype(np.int64), [str(s) for s in data["languages"]],
                       data["label"], correct)


def majority_rate(labels: np.ndarray, langs: np.ndarray, n_lang: int) -> np.ndarray:
    """Per language, the share of its most frequent label: the accuracy of always predicting it, the
    floor a model must clear to have learned anything. NaN for a language without examples."""
    labels, langs = np.asarray(labels, dtype=np.int64), np.asarray(langs, dtype=np.int64)
    out = np.full(n_lang, np.nan)
    for g in range(n_lang):
        sel = labels[langs == g]
        if sel.size:
            out[g] = np.bincount(sel - sel.min()).max() / sel.size
    return out


def paired_accuracy_differences(predictions: Predictions, a: str, b: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-example ``correct_a − correct_b`` (−1, 0, 1) with each example's language code and the
    language names: the units a hierarchical bootstrap over training seeds resamples."""
    diff = predictions.column(a).astype(np.float64) - predictions.column(b).astype(np.float64)
    return diff, predictions.lang.copy(), list(predictions.languages)


def stratified_mean_over_groups(
    values: np.ndarray, groups: np.ndarray, n_groups: int, n_resamples: int, seed: int, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over groups of the per-group means of ``values`` (n, k), with a percentile interval from
    resampling within each group (every language keeps its size, and counts equally). Uses the
    child seeds of ``bootstrap_group_means``, so its resamples are the per-language rows' resamples."""
    values = np.asarray(values, dtype=np.float64).reshape(len(groups), -1)
    children = np.random.SeedSequence(seed).spawn(n_groups)
    point, resampled = [], []
    for g in range(n_groups):
        rows = values[groups == g]
        if rows.shape[0]:
            point.append(rows.mean(axis=0))
            resampled.append(resampled_means(rows, n_resamples, np.random.default_rng(children[g])))
    if not point:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan.copy(), nan.copy()
    means = np.mean(resampled, axis=0)  # (n_resamples, k)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return np.mean(point, axis=0), low, high


def beats_majority(low: float, high: float, majority: float) -> str:
    """``yes`` when the interval's lower end clears the majority rate, ``no`` when the whole interval
    lies below it, ``interval reaches it`` otherwise (a constant predictor could have scored as much)."""
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(majority)):
        return "n/a"
    if low > majority:
        return "yes"
    return "no" if high < majority else "interval reaches it"


def present_columns(predictions: Predictions) -> list[str]:
    """The model columns present, Table 2's order first, then any others."""
    known = [c for c in COLUMNS if c in predictions.correct]
    return known + [c for c in predictions.correct if c not in known]


def difference_name(a: str, b: str) -> str:
    return f"diff_{a}_minus_{b}"


def accuracy_table_with_intervals(
    predictions: Predictions, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict]:
    """One row per language and a ``mean`` row (over languages, resampled within each): ``n_test``,
    ``majority_rate``, per column its accuracy with ``<col>_low``/``<col>_high`` and
    ``<col>_beats_majority``, and per present pair ``diff_<a>_minus_<b>`` with its paired interval.
    Values are fractions (as in accuracy.csv)."""
    columns = present_columns(predictions)
    n_lang, lang = predictions.n_lang, predictions.lang
    boot_seed = name_seed("accuracy_stats", seed)
    values = np.stack([predictions.correct[c] for c in columns], axis=1).astype(np.float64)
    mean, low, high = bootstrap_group_means(values, lang, n_lang, n_resamples, boot_seed, level)
    all_mean, all_low, all_high = stratified_mean_over_groups(values, lang, n_lang, n_resamples, boot_seed, level)
    majority = majority_rate(predictions.label, lang, n_lang)
    counts = np.bincount(lang, minlength=n_lang)
    rows = [{"language": name, "n_test": int(counts[g]), "majority_rate": float(majority[g])}
            for g, name in enumerate(predictions.languages)]
    present = majority[np.isfinite(majority)]
    rows.append({"language": "mean", "n_test": int(counts.sum()),
                 "majority_rate": float(present.mean()) if present.size else float("nan")})
    for j, c in enumerate(columns):
        cells = [(mean[g, j], low[g, j], high[g, j]) for g in range(n_lang)] + [(all_mean[j], all_low[j], all_high[j])]
        for row, (m, lo, hi) in zip(rows, cells):
            row.update({c: float(m), f"{c}_low": float(lo), f"{c}_high": float(hi),
                        f"{c}_beats_majority": beats_majority(lo, hi, row["majority_rate"])})
    for a, b in DIFFERENCES:
        if a in predictions.correct and b in predictions.correct:
            add_difference(rows, predictions, a, b, n_resamples, boot_seed, level)
    return rows


def add_difference(rows: list[dict], predictions: Predictions, a: str, b: str, n_resamples: int, seed: int,
                   level: float) -> None:
    """Add ``a − b`` with its paired-bootstrap interval to every row (languages, then the mean)."""
    n_lang, lang = predictions.n_lang, predictions.lang
    diff, _, _ = paired_accuracy_differences(predictions, a, b)
    mean, low, high = paired_difference(predictions.column(a), predictions.column(b), lang, n_lang, n_resamples,
                                        seed, level)
    all_mean, all_low, all_high = stratified_mean_over_groups(diff, lang, n_lang, n_resamples, seed, level)
    name = difference_name(a, b)
    cells = [(mean[g, 0], low[g, 0], high[g, 0]) for g in range(n_lang)] + [(all_mean[0], all_low[0], all_high[0])]
    for row, (m, lo, hi) in zip(rows, cells):
        row.update({name: float(m), f"{name}_low": float(lo), f"{name}_high": float(hi)})


def below_majority(rows: list[dict]) -> dict[str, list[str]]:
    """Per column, the languages (not the mean row) where it does not beat the majority rate."""
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["language"] == "mean":
            continue
        for key, verdict in row.items():
            if key.endswith("_beats_majority") and verdict in ("no", "interval reaches it"):
                out.setdefault(key.removesuffix("_beats_majority"), []).append(row["language"])
    return out
