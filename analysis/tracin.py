"""TracIn scores from gradient sketches, and exact top-m rankings computed by streaming.

TracIn (Pruthi et al. 2020) scores a training example z against a test example z' as
Σ_e w_e ⟨g(z, θ_e), g(z', θ_e)⟩ over per-epoch checkpoints θ_e. The paper replaces the dot
product by a cosine (Barshan et al. 2020) so that examples with huge gradients do not dominate
every ranking. Three normalisations are offered:

- ``cosine``: both vectors unit norm per checkpoint (the default; a true cosine);
- ``train-norm``: only the training vector is unit norm (the paper's wording, "normalising by the
  norm of the training gradients"; the test norm is constant per test example, so its *ranking*
  at one checkpoint equals the cosine's, but sums over checkpoints differ);
- ``dot``: plain TracIn.

A full N_test × N_train score matrix does not fit in memory for large runs, so the ranking
streams over blocks of training rows (and, if needed, of test rows) and keeps an exact running
top-m per test example. Ties are broken deterministically: the lower training index wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Normalization = Literal["cosine", "train-norm", "dot"]
NORMALIZATIONS: tuple[str, ...] = ("cosine", "train-norm", "dot")


def is_unit_normalized(normalization: str, side: Literal["train", "test"]) -> bool:
    """Whether this side's vectors are scaled to unit norm under ``normalization``."""
    return normalization == "cosine" or (normalization == "train-norm" and side == "train")


def row_scales(vectors: np.ndarray, normalization: str, side: Literal["train", "test"]) -> np.ndarray:
    """Per-row factors that turn raw gradient sketches into the vectors whose dot product is the score.

    A zero vector (a gradient that underflowed, e.g. a perfectly confident example) gets factor 0
    under a unit-norm normalisation, so its scores are 0 instead of NaN.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
        )
    if side not in ("train", "test"):
        raise ValueError(f"side must be 'train' or 'test', found {side!r}")
    n = vectors.shape[0]
    if not is_unit_normalized(normalization, side):
        return np.ones(n, dtype=np.float64)
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)
    scales = np.zeros(n, dtype=np.float64)
    np.divide(1.0, norms, out=scales, where=norms > 0)
    return scales


def normalize(
    vectors: np.ndarray, normalization: str, side: Literal["train", "test"], dtype: type = np.float64
) -> np.ndarray:
    """``vectors`` scaled row-wise as ``normalization`` asks for this side, as a new ``dtype`` array."""
    out = np.array(vectors, dtype=dtype, copy=True)
    out *= row_scales(vectors, normalization, side).astype(dtype)[:, None]
    return out


def checkpoint_weights(n_checkpoints: int, weights: Sequence[float] | None) -> np.ndarray:
    """Per-checkpoint weights (the learning rate at each checkpoint in Pruthi et al.); ones if not given."""
    if weights is None:
        return np.ones(n_checkpoints, dtype=np.float64)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n_checkpoints,):
        raise ValueError(f"lr_weights: expected {n_checkpoints} values (one per checkpoint), found {w.size}")
    if not np.isfinite(w).all():
        raise ValueError(f"lr_weights: expected finite numbers, found {w.tolist()}")
    return w


def _check_checkpoint_lists(test_by_ckpt: Sequence[np.ndarray], train_by_ckpt: Sequence[np.ndarray]) -> None:
    if len(test_by_ckpt) == 0 or len(test_by_ckpt) != len(train_by_ckpt):
        raise ValueError(
            f"expected the same non-zero number of test and train checkpoints, found {len(test_by_ckpt)} and "
            f"{len(train_by_ckpt)}"
        )
    n, d = test_by_ckpt[0].shape
    big_n = train_by_ckpt[0].shape[0]
    for e, (t, r) in enumerate(zip(test_by_ckpt, train_by_ckpt)):
        if t.ndim != 2 or r.ndim != 2 or t.shape != (n, d) or r.shape != (big_n, d):
            raise ValueError(
                f"checkpoint {e}: expected test ({n}, {d}) and train ({big_n}, {d}), found {t.shape} and {r.shape}"
            )


def tracin_scores(
    test_by_ckpt: Sequence[np.ndarray],
    train_by_ckpt: Sequence[np.ndarray],
    normalization: str = "cosine",
    lr_weights: Sequence[float] | None = None,
) -> np.ndarray:
    """The full n_test × n_train TracIn matrix, in float64. For small inputs and references only:
    the ranking stage never materialises it (see ``stream_top_k``)."""
    _check_checkpoint_lists(test_by_ckpt, train_by_ckpt)
    w = checkpoint_weights(len(test_by_ckpt), lr_weights)
    total = np.zeros((test_by_ckpt[0].shape[0], train_by_ckpt[0].shape[0]), dtype=np.float64)
    for we, t, r in zip(w, test_by_ckpt, train_by_ckpt):
        total += we * (normalize(t, normalization, "test") @ normalize(r, normalization, "train").T)
    return total


@dataclass
class TopK:
    """The m best training examples per test example, best first.

    Attributes:
        idx: (n, m) int64 training indices.
        score: (n, m) float64 scores (descending for the most positive, ascending for the most negative).
    """

    idx: np.ndarray
    score: np.ndarray


class TopKAccumulator:
    """An exact running top-m per row over column blocks visited in increasing column order.

    Candidates are kept in ascending column order, so among equal scores the candidate that
    comes first in the concatenation [kept candidates | new block] has the lower column index:
    a cumulative count of ties then keeps the lowest indices without any sorting.
    """

    def __init__(self, n_rows: int, m: int, largest: bool = True):
        if m < 1:
            raise ValueError(f"m must be at least 1, found {m}")
        self.m = m
        self.largest = largest
        self.idx = np.zeros((n_rows, 0), dtype=np.int64)
        self.score = np.zeros((n_rows, 0), dtype=np.float64)
        self._last = -1

    def update(self, scores: np.ndarray, columns: np.ndarray, check_finite: bool = True) -> None:
        """Merge a block: ``scores`` (n_rows, B) for the column indices ``columns`` (B,), which must be
        ascending and larger than every column seen before. ``check_finite=False`` skips the NaN/inf
        check when the caller has already checked (a NaN would silently corrupt the selection)."""
        columns = np.asarray(columns, dtype=np.int64)
        if scores.shape != (self.idx.shape[0], columns.size):
            raise ValueError(
                f"expected scores of shape {(self.idx.shape[0], columns.size)}, found {scores.shape}"
            )
        if columns.size == 0:
            return
        if columns[0] <= self._last or (columns.size > 1 and np.any(np.diff(columns) <= 0)):
            raise ValueError("column blocks must be visited in strictly increasing column order")
        if check_finite and not np.isfinite(scores).all():
            raise ValueError("non-finite TracIn score (NaN or inf in a gradient sketch?)")
        self._last = int(columns[-1])
        n = scores.shape[0]
        if self.score.shape[1] < self.m:
            cand_score = np.concatenate([self.score, scores.astype(np.float64, copy=False)], axis=1)
            cand_idx = np.concatenate([self.idx, np.broadcast_to(columns, (n, columns.size))], axis=1)
        else:
            # Once m candidates are kept, only block entries strictly better than a row's worst kept
            # score can enter (an equal one has a higher index, so it loses the tie): gather those few
            # and select among kept + gathered, instead of among kept + the whole block.
            worst = self.score.min(axis=1) if self.largest else self.score.max(axis=1)
            # kept scores are earlier blocks' values upcast to float64: casting back is exact, and a
            # same-dtype comparison avoids converting the whole block
            worst = worst.astype(scores.dtype, copy=False)
            better = scores > worst[:, None] if self.largest else scores < worst[:, None]
            counts = better.sum(axis=1)
            width = int(counts.max()) if n else 0
            if width == 0:
                return
            rows, cols = np.nonzero(better)  # row-major: ascending columns within a row
            slots = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
            pad = -np.inf if self.largest else np.inf  # never selected: every row has m real candidates
            new_score = np.full((n, width), pad)
            new_idx = np.full((n, width), np.iinfo(np.int64).max, dtype=np.int64)
            new_score[rows, slots] = scores[rows, cols]
            new_idx[rows, slots] = columns[cols]
            cand_score = np.concatenate([self.score, new_score], axis=1)
            cand_idx = np.concatenate([self.idx, new_idx], axis=1)
        total = cand_score.shape[1]
        if total <= self.m:
            self.score, self.idx = cand_score, cand_idx
            return
        kth = total - self.m if self.largest else self.m - 1
        threshold = np.partition(cand_score, kth, axis=1)[:, kth : kth + 1]  # the m-th best value per row
        above = cand_score > threshold if self.largest else cand_score < threshold
        tied = cand_score == threshold
        need = self.m - above.sum(axis=1)
        keep = above | tied
        # rows with more ties at the threshold than places left keep the lowest columns (= first in row)
        crowded = np.flatnonzero(tied.sum(axis=1) > need)
        if crowded.size:
            sub = tied[crowded]
            keep[crowded] &= ~(sub & (np.cumsum(sub, axis=1) > need[crowded, None]))
        self.score = cand_score[keep].reshape(n, self.m)
        self.idx = cand_idx[keep].reshape(n, self.m)

    def result(self) -> TopK:
        """The kept candidates sorted best first (ties: lower index first)."""
        key = -self.score if self.largest else self.score
        order = np.lexsort((self.idx, key), axis=1)
        return TopK(np.take_along_axis(self.idx, order, 1), np.take_along_axis(self.score, order, 1))


def rank_top_k(scores: np.ndarray, m: int, largest: bool = True, block_size: int | None = None) -> TopK:
    """Exact top-m per row of an in-memory score matrix (column index = training index)."""
    scores = np.asarray(scores)
    acc = TopKAccumulator(scores.shape[0], min(m, scores.shape[1]), largest)
    step = block_size or max(scores.shape[1], 1)
    for start in range(0, scores.shape[1], step):
        stop = min(start + step, scores.shape[1])
        acc.update(scores[:, start:stop], np.arange(start, stop))
    return acc.result()


@dataclass
class Rankings:
    """Top-m most positive and most negative training examples, summed over checkpoints and per checkpoint.

    Attributes:
        pos: top-m by summed score (descending).
        neg: bottom-m by summed score (ascending).
        pos_by_ckpt: per checkpoint alone (unweighted), same order as the inputs; empty if not asked for.
        neg_by_ckpt: idem for the most negative.
    """

    pos: TopK
    neg: TopK
    pos_by_ckpt: list[TopK]
    neg_by_ckpt: list[TopK]


def plan_blocks(
    n_test: int, n_train: int, d: int, n_ckpt: int, m: int, memory_mb: float, itemsize: int = 8
) -> tuple[int, int]:
    """(test rows, train rows) per block so that the working set stays near ``memory_mb``.

    Working set: a test chunk and a train block for every checkpoint, plus the score blocks
    (summed and per checkpoint) and the selection's temporaries (~4 arrays of chunk × (block + m)).
    """
    budget = max(memory_mb, 1.0) * 2**20 / itemsize
    test_rows = int(min(max(n_test, 1), max(1, budget / 4 / max(d * n_ckpt, 1))))
    per_train_row = test_rows * (n_ckpt + 1 + 4) + d * n_ckpt
    train_rows = int(max(1, (budget - test_rows * d * n_ckpt) / per_train_row))
    return test_rows, int(min(max(n_train, 1), max(train_rows, m)))


def stream_top_k(
    test_by_ckpt: Sequence[np.ndarray],
    train_by_ckpt: Sequence[np.ndarray],
    m: int = 100,
    normalization: str = "cosine",
    lr_weights: Sequence[float] | None = None,
    per_checkpoint: bool = True,
    train_block: int | None = None,
    test_block: int | None = None,
    memory_mb: float = 1024.0,
    dtype: type = np.float64,
    progress=None,
) -> Rankings:
    """Exact TracIn top-m (most positive and most negative) per test row, never holding more than a
    test chunk × train block of scores.

    Args:
        test_by_ckpt: per checkpoint, an (n_test, d) array (e.g. a memory map), rows aligned across checkpoints.
        train_by_ckpt: per checkpoint, an (n_train, d) array; column j of a ranking is row j here.
        m: how many training examples to keep per test example and sign (capped at n_train).
        normalization: ``cosine``, ``train-norm`` or ``dot`` (module docstring).
        lr_weights: per-checkpoint weights of the summed score; per-checkpoint rankings are unweighted.
        per_checkpoint: also rank by each checkpoint's score alone (for the dynamics figures).
        train_block: training rows per block; None plans it from ``memory_mb``.
        test_block: test rows per chunk; None plans it from ``memory_mb``.
        memory_mb: working-set budget used when block sizes are not given.
        dtype: float64 (default, exact to rounding) or float32 (~1e-6 relative error; faster at large d only).
        progress: optional callable(done_pairs, total_pairs) called after each block (test × train pairs scored).
    """
    _check_checkpoint_lists(test_by_ckpt, train_by_ckpt)
    n_ckpt = len(test_by_ckpt)
    n_test, d = test_by_ckpt[0].shape
    n_train = train_by_ckpt[0].shape[0]
    if n_train == 0:
        raise ValueError("no training examples to rank")
    w = checkpoint_weights(n_ckpt, lr_weights)
    m = min(m, n_train)
    itemsize = np.dtype(dtype).itemsize
    planned = plan_blocks(n_test, n_train, d, n_ckpt, m, memory_mb, itemsize)
    tb = test_block or planned[0]
    rb = train_block or planned[1]

    def empty(k: int) -> TopK:
        return TopK(np.zeros((0, k), np.int64), np.zeros((0, k), np.float64))

    parts: list[Rankings] = []
    for t0 in range(0, max(n_test, 1), tb):
        t1 = min(t0 + tb, n_test)
        if t1 <= t0:
            break
        tests = [normalize(t[t0:t1], normalization, "test", dtype) for t in test_by_ckpt]
        acc_pos = TopKAccumulator(t1 - t0, m, True)
        acc_neg = TopKAccumulator(t1 - t0, m, False)
        by_ckpt = [
            (TopKAccumulator(t1 - t0, m, True), TopKAccumulator(t1 - t0, m, False))
            for _ in range(n_ckpt if per_checkpoint else 0)
        ]
        for r0 in range(0, n_train, rb):
            r1 = min(r0 + rb, n_train)
            cols = np.arange(r0, r1)
            total = np.zeros((t1 - t0, r1 - r0), dtype=np.float64)
            per_ckpt = []
            with np.errstate(invalid="ignore", over="ignore"):  # checked just below, with a clear message
                for e in range(n_ckpt):
                    block = normalize(train_by_ckpt[e][r0:r1], normalization, "train", dtype)
                    s = tests[e] @ block.T
                    total += w[e] * s
                    per_ckpt.append(s)
            # a NaN or inf in any checkpoint's scores makes the (weighted) sum non-finite too
            if not np.isfinite(total).all():
                raise ValueError("non-finite TracIn score (NaN or inf in a gradient sketch?)")
            for (acc_p, acc_n), s in zip(by_ckpt, per_ckpt):
                acc_p.update(s, cols, check_finite=False)
                acc_n.update(s, cols, check_finite=False)
            acc_pos.update(total, cols, check_finite=False)
            acc_neg.update(total, cols, check_finite=False)
            if progress is not None:
                progress(t0 * n_train + (t1 - t0) * r1, n_test * n_train)
        parts.append(
            Rankings(
                acc_pos.result(),
                acc_neg.result(),
                [a.result() for a, _ in by_ckpt],
                [b.result() for _, b in by_ckpt],
            )
        )
    if not parts:
        k = n_ckpt if per_checkpoint else 0
        return Rankings(empty(m), empty(m), [empty(m)] * k, [empty(m)] * k)

    def cat(tops: list[TopK]) -> TopK:
        return TopK(np.concatenate([t.idx for t in tops]), np.concatenate([t.score for t in tops]))

    k = n_ckpt if per_checkpoint else 0
    return Rankings(
        cat([p.pos for p in parts]),
        cat([p.neg for p in parts]),
        [cat([p.pos_by_ckpt[e] for p in parts]) for e in range(k)],
        [cat([p.neg_by_ckpt[e] for p in parts]) for e in range(k)],
    )
