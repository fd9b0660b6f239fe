"""``compare_rankings``: how close approximate rankings (sketches) are to exact ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ..contributions import SIGNS, mean_matrix
from .options import InfluenceError
from .topk_file import TopKFile, load_topk


@dataclass
class Fidelity:
    """How well approximate rankings (e.g. d=256 sketches) reproduce exact ones.

    Attributes:
        n_test: test examples ranked by both.
        m: ranking depth compared (the smaller of the two).
        recall_pos: mean over test examples of |approx top-m ∩ exact top-m| / m, most positive.
        recall_neg: the same for the most negative.
        spearman: mean over test examples of the Spearman correlation between approximate and exact
            scores of the training examples both rankings list (positive and negative sets together).
        max_contribution_diff_pp: largest |approx − exact| over cells and signs of the language-contribution
            matrices, in percentage points.
    """

    n_test: int
    m: int
    recall_pos: float
    recall_neg: float
    spearman: float
    max_contribution_diff_pp: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare_rankings(approx_topk: TopKFile | str | Path, exact_topk: TopKFile | str | Path) -> Fidelity:
    """Recall@m of the top-m sets, Spearman of scores, and the largest change in contributions (pp)."""
    approx = approx_topk if isinstance(approx_topk, TopKFile) else load_topk(approx_topk)
    exact = exact_topk if isinstance(exact_topk, TopKFile) else load_topk(exact_topk)
    common, ia, ie = np.intersect1d(approx["test_indices"], exact["test_indices"], return_indices=True)
    if common.size == 0:
        raise InfluenceError("compare_rankings: the two rankings share no test example")
    m = min(approx["pos_idx"].shape[1], exact["pos_idx"].shape[1])
    recalls = {}
    for sign in SIGNS:
        a, e = approx[f"{sign}_idx"][ia, :m], exact[f"{sign}_idx"][ie, :m]
        recalls[sign] = float(np.mean([np.intersect1d(x, y).size / m for x, y in zip(a, e)]))
    rhos = []
    for ra, re_ in zip(ia, ie):
        sa = dict(
            zip(
                np.concatenate([approx["pos_idx"][ra], approx["neg_idx"][ra]]).tolist(),
                np.concatenate([approx["pos_score"][ra], approx["neg_score"][ra]]).tolist(),
            )
        )
        se = dict(
            zip(
                np.concatenate([exact["pos_idx"][re_], exact["neg_idx"][re_]]).tolist(),
                np.concatenate([exact["pos_score"][re_], exact["neg_score"][re_]]).tolist(),
            )
        )
        both = sorted(set(sa) & set(se))
        if len(both) >= 3:
            x, y = [sa[k] for k in both], [se[k] for k in both]
            if np.ptp(x) > 0 and np.ptp(y) > 0:
                rhos.append(stats.spearmanr(x, y).statistic)
    diff = 0.0
    n_lang = len(approx.languages)
    codes_a = approx.test_codes()[ia]
    for sign in SIGNS:
        mat_a = _mean_rows(approx.shares(sign, ia), codes_a, n_lang)
        mat_e = _mean_rows(exact.shares(sign, ie), exact.test_codes()[ie], n_lang)
        d = np.abs(mat_a - mat_e)
        if np.isfinite(d).any():
            diff = max(diff, float(np.nanmax(d)))
    return Fidelity(
        int(common.size),
        int(m),
        recalls["pos"],
        recalls["neg"],
        float(np.mean(rhos)) if rhos else float("nan"),
        diff,
    )


def _mean_rows(shares: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    return mean_matrix(shares, codes, n)[0]

