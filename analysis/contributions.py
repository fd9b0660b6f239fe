"""Language contributions: which training languages a test example's most influential examples come from.

The paper's measure (Sec. 4.3): for each test example, the share (%) of its top-m most positively
(or most negatively) influential training examples that belong to each training language,
averaged over a test language's examples → a test × train matrix per sign. Comparisons between
models use only test examples that every compared model classifies correctly, matched by test
dataset index, so the difference of two matrices is a per-example (paired) difference.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_csv_atomic

SIGNS: tuple[str, ...] = ("pos", "neg")
CSV_COLUMNS = ["test_lang", "train_lang", "sign", "percent", "ci_low", "ci_high", "n_test"]


def language_codes(langs: Sequence[str], languages: Sequence[str], what: str = "languages") -> np.ndarray:
    """Positions of ``langs`` in the run's language order ``languages``."""
    position = {lang: i for i, lang in enumerate(languages)}
    unknown = sorted({str(lang) for lang in langs} - set(position))
    if unknown:
        raise ValueError(f"{what}: language(s) {unknown} are not among the run's languages {list(languages)}")
    return np.array([position[str(lang)] for lang in langs], dtype=np.int64)


def train_language_lookup(
    train_indices: np.ndarray, train_langs: Sequence[str], languages: Sequence[str]
) -> np.ndarray:
    """An array mapping a training dataset index to its language code (-1 where unknown)."""
    train_indices = np.asarray(train_indices, dtype=np.int64)
    size = int(train_indices.max()) + 1 if train_indices.size else 0
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[train_indices] = language_codes(train_langs, languages, "training languages")
    return lookup


def language_shares(top_idx: np.ndarray, lookup: np.ndarray, n_languages: int) -> np.ndarray:
    """(n, L) percentages: the share of each test example's top-m (row of ``top_idx``) per training language.

    Every row sums to 100 (when m > 0): each of the m training examples belongs to one language.
    """
    top_idx = np.asarray(top_idx, dtype=np.int64)
    n, m = top_idx.shape
    if m == 0:
        return np.zeros((n, n_languages))
    if top_idx.min(initial=0) < 0 or top_idx.max(initial=-1) >= lookup.size or (lookup[top_idx] < 0).any():
        raise ValueError(
            "a ranked training index has no known language (rankings and training metadata disagree)"
        )
    codes = lookup[top_idx]
    counts = np.zeros((n, n_languages), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), m), codes.reshape(-1)), 1)
    return counts * (100.0 / m)


def mean_matrix(
    shares: np.ndarray, test_codes: np.ndarray, n_languages: int
) -> tuple[np.ndarray, np.ndarray]:
    """Average the per-example shares per test language → ((L_test, L_train) matrix, counts per test language).
    Rows of test languages without examples are NaN."""
    test_codes = np.asarray(test_codes, dtype=np.int64)
    sums = np.zeros((n_languages, shares.shape[1]))
    np.add.at(sums, test_codes, shares)
    counts = np.bincount(test_codes, minlength=n_languages)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def in_language_share(shares: np.ndarray, test_codes: np.ndarray) -> np.ndarray:
    """Per test example, the share of its own language among its top-m (language specialisation)."""
    return shares[np.arange(shares.shape[0]), np.asarray(test_codes, dtype=np.int64)]


def common_correct(tables: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Test dataset indices present in every (test_indices, correct) table and correct in all of them, ascending.

    This is the paper's filter: compare influence only on test examples every compared model gets right.
    """
    if not tables:
        raise ValueError("common_correct needs at least one (test_indices, correct) table")
    kept: np.ndarray | None = None
    for indices, correct in tables:
        indices = np.asarray(indices, dtype=np.int64)
        correct = np.asarray(correct, dtype=bool)
        if indices.shape != correct.shape:
            raise ValueError(f"test_indices and correct differ in shape: {indices.shape} vs {correct.shape}")
        good = np.unique(indices[correct])
        kept = good if kept is None else np.intersect1d(kept, good)
    return kept


def positions_of(indices: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row positions in ``indices`` of each value of ``wanted`` (all must be present)."""
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    where = np.searchsorted(indices[order], wanted)
    where = np.clip(where, 0, max(indices.size - 1, 0))
    if indices.size == 0 or not np.array_equal(indices[order][where], wanted):
        raise ValueError("some wanted test indices are not in the rankings")
    return order[where]


@dataclass
class ContributionTable:
    """Test × train language percentages per sign, with confidence intervals.

    Attributes:
        languages: the language order of both axes.
        percent: dict sign → (L, L) matrix (rows: test language, columns: train language).
        ci_low: dict sign → (L, L).
        ci_high: dict sign → (L, L).
        n_test: (L,) test examples per test language that entered the averages.
    """

    languages: list[str]
    percent: dict[str, np.ndarray]
    ci_low: dict[str, np.ndarray]
    ci_high: dict[str, np.ndarray]
    n_test: np.ndarray
    notes: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        out = []
        for sign in SIGNS:
            if sign not in self.percent:
                continue
            for i, test in enumerate(self.languages):
                for j, train in enumerate(self.languages):
                    out.append(
                        {
                            "test_lang": test,
                            "train_lang": train,
                            "sign": sign,
                            "percent": float(self.percent[sign][i, j]),
                            "ci_low": float(self.ci_low[sign][i, j]),
                            "ci_high": float(self.ci_high[sign][i, j]),
                            "n_test": int(self.n_test[i]),
                        }
                    )
        return out

    def write_csv(self, path: str | Path) -> Path:
        """Write the contract's CSV (test_lang,train_lang,sign,percent,ci_low,ci_high,n_test) atomically."""
        return write_rows_csv(path, self.rows(), CSV_COLUMNS)


def write_rows_csv(path: str | Path, rows: list[dict], columns: Sequence[str]) -> Path:
    """Write dict rows (the keys ``columns`` names, in that order; others left out) as CSV, atomically."""
    return write_csv_atomic(path, list(columns), [[_fmt(row.get(k, "")) for k in columns] for row in rows])


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if not np.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def read_contributions_csv(path: str | Path) -> ContributionTable:
    """Read a ``contributions.csv`` back (language order = order of first appearance)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(CSV_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected {CSV_COLUMNS}")
        rows = list(reader)
    languages: list[str] = []
    for row in rows:
        for key in ("test_lang", "train_lang"):
            if row[key] not in languages:
                languages.append(row[key])
    pos = {lang: i for i, lang in enumerate(languages)}
    n = len(languages)
    percent, low, high = {}, {}, {}
    n_test = np.zeros(n, dtype=np.int64)
    for line, row in enumerate(rows, start=2):
        sign = row["sign"]
        if sign not in SIGNS:
            raise ValueError(f"{path}, line {line}: sign must be pos or neg, found {sign!r}")
        for table in (percent, low, high):
            table.setdefault(sign, np.full((n, n), np.nan))
        i, j = pos[row["test_lang"]], pos[row["train_lang"]]
        try:
            percent[sign][i, j] = float(row["percent"])
            low[sign][i, j] = float(row["ci_low"])
            high[sign][i, j] = float(row["ci_high"])
            n_test[i] = int(row["n_test"])
        except ValueError as err:
            raise ValueError(f"{path}, line {line}: {err}") from None
    return ContributionTable(languages, percent, low, high, n_test)
