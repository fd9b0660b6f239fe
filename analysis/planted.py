"""The planted control's verdicts: does each of the study's measures find an effect that is known to be
there? (The data option that plants it: ``datamodules/planting.py``.)

Three measures, each against what chance or the noise would give:
- retraining: leaving the planted language out should raise that language's test loss more than any
  other cell and more than any refit with nothing removed does;
- TracIn's predicted removal effect: the same cell first, above the random control's, and of a size
  comparable with retraining's (their ratio is reported, not assumed);
- TracIn's rankings: for a marked test item, the marked training items should rank high: the mean
  average precision (area under the precision-recall curve) of finding them in the ranked pool, against
  the share of marked items in the pool, which is what a random ranking gets. Every other attribution
  method over the same sketches (``analysis/influence/methods.py``) is scored the same way beside it.
numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

# how a method is named in a sentence
METHOD_NAMES = {"tracin": "TracIn", "trak": "TRAK's kernel", "repsim": "representation similarity",
                "ekfac": "EK-FAC influence"}


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one ranking: the mean, over the relevant items, of the precision among the
    items ranked at or above each (highest score first; ties by lower position, as the top-m ranking
    breaks them). NaN when nothing is relevant."""
    relevant = np.asarray(relevant, dtype=bool)
    if not relevant.any():
        return float("nan")
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    hits = relevant[order]
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at[hits].mean())


@dataclass(frozen=True)
class PlantedRetrieval:
    """How well TracIn's scores find the marked training items for marked test items.

    Attributes:
        mean_ap: mean average precision over the marked test items (AUPRC).
        chance: the share of marked items in the ranked pool: a random ranking's expected average precision.
        n_test / n_pool / n_marked_pool: marked test items ranked, pool size, marked items in the pool.
        unmarked_mean_ap: the same average precision for the planted language's *unmarked* test items: the
            marker, not the language, should be what the marked test items find.
        m: the top-m of the shares below (None: not measured).
        top_m_share_marked / top_m_share_unmarked: the planted language's share of the top-m training items
            of its marked and of its unmarked test items: the in-language share the report draws, split by
            whether the test item carries the marker (an unplanted run is the unmarked items' level).
        ap_p: one-sided permutation p of the marked test items' mean average precision exceeding the unmarked
            ones' (marker labels shuffled among the planted language's test items): whether the ranking finds
            the marked training items because of the marker, with the few marked items a small share gives.
    """

    mean_ap: float
    chance: float
    n_test: int
    n_pool: int
    n_marked_pool: int
    unmarked_mean_ap: float
    m: int | None = None
    top_m_share_marked: float = float("nan")
    top_m_share_unmarked: float = float("nan")
    ap_p: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def permutation_p_greater(first: Sequence[float], second: Sequence[float], n_resamples: int = 10_000,
                          seed: int = 0) -> float:
    """One-sided permutation p of mean(first) − mean(second) being as large as observed when the two
    groups' labels are shuffled: (1 + permutations at least as large) / (1 + n_resamples). NaN when a group
    is empty."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if not first.size or not second.size:
        return float("nan")
    values = np.concatenate([first, second])
    observed = first.mean() - second.mean()
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((n_resamples, values.size)), axis=1)[:, : first.size]
    picked = values[draws].sum(axis=1)
    differences = picked / first.size - (values.sum() - picked) / second.size
    return float((1 + np.sum(differences >= observed - 1e-12)) / (1 + n_resamples))


def planted_retrieval(scores: np.ndarray, pool_marked: np.ndarray, test_marked: np.ndarray,
                      test_in_language: np.ndarray, pool_in_language: np.ndarray | None = None,
                      m: int | None = None) -> PlantedRetrieval:
    """``scores`` (test rows, pool columns) of TracIn; ``pool_marked`` which pool items carry the marker;
    ``test_marked`` which test rows do; ``test_in_language`` which test rows are of the planted language;
    ``pool_in_language`` and ``m``: which pool items are, for the top-m shares (ties broken by position)."""
    pool_marked = np.asarray(pool_marked, dtype=bool)
    test_marked, in_language = np.asarray(test_marked, dtype=bool), np.asarray(test_in_language, dtype=bool)
    marked = [average_precision(row, pool_marked) for row in scores[test_marked]]
    unmarked = [average_precision(row, pool_marked) for row in scores[in_language & ~test_marked]]
    shares = {}
    if pool_in_language is not None and m:
        pool_lang = np.asarray(pool_in_language, dtype=bool)
        for key, rows in (("top_m_share_marked", test_marked), ("top_m_share_unmarked", in_language & ~test_marked)):
            tops = [np.lexsort((np.arange(row.size), -row))[:m] for row in np.asarray(scores, dtype=np.float64)[rows]]
            shares[key] = float(np.mean([pool_lang[top].mean() for top in tops])) if tops else float("nan")
    return PlantedRetrieval(
        mean_ap=float(np.mean(marked)) if marked else float("nan"),
        chance=float(pool_marked.mean()) if pool_marked.size else float("nan"),
        n_test=len(marked), n_pool=int(pool_marked.size), n_marked_pool=int(pool_marked.sum()),
        unmarked_mean_ap=float(np.mean(unmarked)) if unmarked else float("nan"),
        m=m if shares else None, **shares, ap_p=permutation_p_greater(marked, unmarked),
    )


@dataclass(frozen=True)
class PlantedCell:
    """The cell (planted test language, planted language removed) under one measure.

    Attributes:
        value / low / high: the pooled change of the planted language's mean test loss and its interval.
        rank: its place among all leave-out cells, largest first (1: the largest).
        n_cells: how many cells were ranked.
        control: the random control's value for the planted test language.
        marked_value: the mean change over the marked test items alone (the effect is theirs).
    """

    value: float
    low: float
    high: float
    rank: int
    n_cells: int
    control: float
    marked_value: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlantedInputs:
    """What the counterfactual check needs to judge a planted run: the planted language and share, which
    test examples (in the check's test order) carry the marker, and TracIn's retrieval of marked items."""

    language: str
    fraction: float
    marked: np.ndarray
    retrieval: PlantedRetrieval | None
    others: Mapping[str, PlantedRetrieval] = field(default_factory=dict)  # other attribution methods' retrieval


def rank_of(value: float, values: Sequence[float]) -> int:
    """1 + how many of ``values`` are strictly larger than ``value`` (NaN ignored)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    return int(1 + np.sum(finite > value))


def planted_cell(grid: np.ndarray, intervals: tuple[float, float, float], test_row: int, removed_col: int,
                 control: float, marked_value: float) -> PlantedCell:
    """The planted cell of a (test languages, removed languages) ``grid`` of pooled values."""
    value, low, high = intervals
    return PlantedCell(value=float(value), low=float(low), high=float(high),
                       rank=rank_of(grid[test_row, removed_col], grid.ravel().tolist()), n_cells=int(np.isfinite(grid).sum()),
                       control=float(control), marked_value=float(marked_value))


def describe_planted(language: str, fraction: float, retrained: PlantedCell, predicted: PlantedCell,
                     retrieval: PlantedRetrieval | None, floor: Mapping[str, float] | None,
                     others: Mapping[str, PlantedRetrieval] | None = None) -> str:
    """One paragraph: what each measure found of the planted effect, beside chance and the noise."""
    noise = (floor or {}).get(language)
    beyond = (f", {'beyond' if abs(retrained.value) > noise else 'within'} the refits' largest change "
              f"({noise:.3f})" if noise is not None else ", retraining's noise not measured (no refits)")
    ratio = predicted.value / retrained.value if retrained.value else float("nan")
    text = (f"Planted control ({100 * fraction:g} % of {language}'s training and test items carry a word that gives "
            f"the label away): leaving {language} out changes {language}'s test loss by {retrained.value:+.3f} "
            f"[{retrained.low:+.3f}, {retrained.high:+.3f}], rank {retrained.rank} of {retrained.n_cells} cells"
            f"{beyond} (marked test items {retrained.marked_value:+.3f}); TracIn predicts {predicted.value:+.4f}, "
            f"rank {predicted.rank} of {predicted.n_cells}, {'above' if predicted.value > predicted.control else 'not above'} "
            f"its random control's {predicted.control:+.4f}, {ratio:.3g} × retraining's change")
    if retrieval is not None and retrieval.n_test:
        text += (f"; for the {retrieval.n_test} marked test items, TracIn's ranking finds the "
                 f"{retrieval.n_marked_pool} marked items of the {retrieval.n_pool}-item pool with average precision "
                 f"{retrieval.mean_ap:.2f} (a random ranking: {retrieval.chance:.2f}; {language}'s unmarked test "
                 f"items: {retrieval.unmarked_mean_ap:.2f}{p_clause(retrieval.ap_p)})")
        if retrieval.m:
            text += (f"; {language}'s share of their top {retrieval.m} is {100 * retrieval.top_m_share_marked:.1f} % "
                     f"against {100 * retrieval.top_m_share_unmarked:.1f} % for {language}'s unmarked test items")
    for method, found in (others or {}).items():
        if found.n_test:
            text += f"; {METHOD_NAMES.get(method, method)} over the same sketches: average precision {found.mean_ap:.2f}"
            if found.m:
                text += (f", {language}'s top-{found.m} share {100 * found.top_m_share_marked:.1f} % against "
                         f"{100 * found.top_m_share_unmarked:.1f} %")
    return text + "."


def p_clause(p: float) -> str:
    return f", permutation p = {p:.3f}" if np.isfinite(p) else ""


def method_rows(retrieval: Mapping | None, by_method: Mapping[str, Mapping] | None,
                agreement: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per attribution method, the leaderboard of a run's check (``counterfactual.json``): how far
    the removal effect its scores imply agrees with retraining over the leave-out cells (``agreement``:
    ``by_method``), and, on a planted run, how well it finds the planted training items (TracIn's
    ``retrieval`` and ``retrieval_by_method``) beside what a random ranking gets. Empty when no method was
    scored."""
    records = ({"tracin": retrieval} if retrieval else {}) | dict(by_method or {})
    rows = []
    for method in dict.fromkeys([*records, *(agreement or {})]):
        r, row = records.get(method) or {}, {"method": METHOD_NAMES.get(method, method)}
        a = (agreement or {}).get(method)
        if a and np.isfinite(a.get("pearson_r", float("nan"))):
            p = a.get("permutation_p", float("nan"))
            row["r with retraining"] = f"{a['pearson_r']:+.2f}" + (f" (p = {p:.2f})" if np.isfinite(p) else "")
        if not r.get("n_test"):
            if a:
                rows.append(row)
            continue
        row |= {"AUPRC, marked test items": f"{r['mean_ap']:.3f}",
               "a random ranking": f"{r['chance']:.3f}",
               "unmarked test items": f"{r['unmarked_mean_ap']:.3f}",
               "p, marked > unmarked": f"{r['ap_p']:.3f}" if np.isfinite(r.get("ap_p", float("nan"))) else "–"}
        if r.get("m"):
            row[f"top-{r['m']} share, marked / unmarked"] = \
                f"{100 * r['top_m_share_marked']:.1f} % / {100 * r['top_m_share_unmarked']:.1f} %"
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key, "–") for key in columns} for row in rows]
