"""Language-contribution tables of rankings: one condition's shares and the paired difference of two.
"""

from __future__ import annotations

import numpy as np

from ..bootstrap import bootstrap_group_means, paired_difference
from ..contributions import (
    SIGNS,
    ContributionTable,
    common_correct,
    positions_of,
)
from ..masks import name_seed
from .options import InfluenceError, InfluenceOptions
from .topk_file import TopKFile


def condition_table(
    top: TopKFile,
    test_indices: np.ndarray,
    options: InfluenceOptions,
    label: str,
    epoch_pos: int | None = None,
) -> ContributionTable:
    """Contribution matrices (pos and neg) with stratified bootstrap CIs over the given test examples.

    ``label`` names the bootstrap's random stream (with ``options.seed``): pass condition names, not
    paths, so that the intervals do not change when a run directory is moved or renamed.
    """
    rows = positions_of(top["test_indices"], np.asarray(test_indices, dtype=np.int64))
    codes = top.test_codes()[rows]
    n_lang = len(top.languages)
    percent, low, high = {}, {}, {}
    for sign in SIGNS:
        shares = top.shares(sign, rows, epoch_pos)
        seed = name_seed("bootstrap", options.seed, label, sign, epoch_pos)
        percent[sign], low[sign], high[sign] = bootstrap_group_means(
            shares, codes, n_lang, options.bootstrap_resamples, seed, options.ci_level
        )
    return ContributionTable(top.languages, percent, low, high, np.bincount(codes, minlength=n_lang))


def difference_table(
    top_a: TopKFile, top_b: TopKFile, test_indices: np.ndarray, options: InfluenceOptions, label: str
) -> ContributionTable:
    """a − b per cell, paired over the same test examples (matched by test dataset index)."""
    if top_a.languages != top_b.languages:
        raise InfluenceError(
            f"cannot compare rankings over different language orders: {top_a.languages} vs {top_b.languages}"
        )
    wanted = np.asarray(test_indices, dtype=np.int64)
    rows_a = positions_of(top_a["test_indices"], wanted)
    rows_b = positions_of(top_b["test_indices"], wanted)
    codes = top_a.test_codes()[rows_a]
    if not np.array_equal(codes, top_b.test_codes()[rows_b]):
        raise InfluenceError(
            "the two rankings give the same test index different languages: are they from the same test split?"
        )
    n_lang = len(top_a.languages)
    percent, low, high = {}, {}, {}
    for sign in SIGNS:
        seed = name_seed("bootstrap-diff", options.seed, label, sign)
        percent[sign], low[sign], high[sign] = paired_difference(
            top_a.shares(sign, rows_a),
            top_b.shares(sign, rows_b),
            codes,
            n_lang,
            options.bootstrap_resamples,
            seed,
            options.ci_level,
        )
    return ContributionTable(top_a.languages, percent, low, high, np.bincount(codes, minlength=n_lang))


def check_same_test_split(top_a: TopKFile, top_b: TopKFile, where_a: str, where_b: str) -> None:
    """Test dataset indices shared by two rankings must name the same items (same ids)."""
    common, ia, ib = np.intersect1d(top_a["test_indices"], top_b["test_indices"], return_indices=True)
    if "test_ids" in top_a.arrays and "test_ids" in top_b.arrays and common.size:
        bad = np.flatnonzero(top_a["test_ids"][ia] != top_b["test_ids"][ib])
        if bad.size:
            i = int(common[bad[0]])
            raise InfluenceError(
                f"{where_a} and {where_b}: test index {i} is item {top_a['test_ids'][ia[bad[0]]]!r} in one and "
                f"{top_b['test_ids'][ib[bad[0]]]!r} in the other; they were not computed on the same test split"
            )


def kept_indices(tops: list[TopKFile]) -> np.ndarray:
    """Test examples present in, and classified correctly by, every ranking (the paper's filter)."""
    return common_correct([(t["test_indices"], t["test_correct"]) for t in tops])

