"""Attribution methods that score test examples against training examples from the same sketches.

Every method here is TracIn's streaming top-m ranking (``analysis/tracin.stream_top_k``) applied to
test rows it may first transform, so that each one produces the same files (``topk.npz``,
``contributions.csv``) and every reader (report, pooling, counterfactual check) takes them alike:

- ``tracin``: gradient similarity at each checkpoint, summed (the paper's method): the test rows as
  sketched, under the options' normalization.
- ``repsim``: the cosine of the sentence representations the classification head reads (the sketch stage
  writes them with ``sketch.kind: representation`` under ``<run>/representations/``), summed over the
  checkpoints analysed: the cheap baseline that needs no gradient.
- ``ekfac``: EK-FAC influence, ``g_testᵀ (F̂ + λI)⁻¹ g_train`` with the Fisher's eigenvalue-corrected
  Kronecker factors, scored through kronfluence by the ekfac stage (``lightning_modules/stages/ekfac.py``)
  and written as features whose dot products are the scores (test rows: the scores; training rows: the
  identity), summed over the checkpoints analysed.
- ``trak``: TRAK's kernel over the projected gradients, ``φ_testᵀ (ΦᵀΦ + λI)⁻¹ φ_train`` per checkpoint,
  summed over checkpoints (TRAK's ensemble over models). ``Φ`` is the sketched training pool; with more
  sketch dimensions than pooled examples (the demo: d = 4096, 750 examples) ``ΦᵀΦ`` is singular and the
  damping ``λ`` decides what the inverse does in the directions no training example spans. ``λ`` is
  ``trak_damping`` times the mean eigenvalue of ``ΦᵀΦ`` (``‖Φ‖²_F / d``), so the choice does not depend
  on the gradients' scale; each checkpoint's ``λ`` is recorded. Features are loss gradients, not TRAK's
  margin gradients with their ``1 − p`` reweighting: for cross-entropy the loss gradient already carries
  the ``p − y`` factor that reweighting approximates.

The kernel is applied to the test side, ``ψ = (ΦᵀΦ + λI)⁻¹ φ_test`` (one Cholesky factorisation per
checkpoint and mask, of the d × d or, with fewer pooled examples than dimensions, the n × n system), and
ψ is ranked against the unchanged training rows by dot product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from ..layout import EKFAC, REPRESENTATIONS
from ..sketch_store import read_sketch, sketch_paths
from ..tracin import tracin_scores
from .options import METHODS, InfluenceError

MAX_KERNEL_DIM = 16384  # a 16384-square float64 kernel is 2 GiB: beyond it, ask for a smaller sketch or pool
ROW_CHUNK = 4096


@dataclass
class PreparedScores:
    """What the streaming ranking receives for one mask: per checkpoint, the test rows (transformed or
    not) and the normalization to rank them under, plus a record of what was done."""

    tests: list
    normalization: str
    record: dict = field(default_factory=dict)


def gram_matrix(rows) -> np.ndarray:
    """ΦᵀΦ (float64) of a possibly memory-mapped (n, d) array, read in chunks of rows."""
    n, d = rows.shape
    gram = np.zeros((d, d))
    for start in range(0, n, ROW_CHUNK):
        block = np.asarray(rows[start : start + ROW_CHUNK], dtype=np.float64)
        gram += block.T @ block
    return gram


def trak_transform(train, tests, damping: float) -> tuple[np.ndarray, float]:
    """(ψ = (ΦᵀΦ + λI)⁻¹ φ for every test row (n_test, d), λ) with ``Φ = train`` (n, d) and
    ``λ = damping · ‖Φ‖²_F / d``. With fewer rows than dimensions the same ψ comes from the n × n system,
    ``ψ = (φ − Φᵀ (ΦΦᵀ + λI)⁻¹ Φ φ) / λ`` (the push-through identity), so an exact (huge-d) gradient works too."""
    n, d = train.shape
    if min(n, d) > MAX_KERNEL_DIM:
        raise InfluenceError(
            f"method trak: {n} training sketches of d = {d}: the {min(n, d)}-square kernel would not fit "
            f"(at most {MAX_KERNEL_DIM}; sketch with combine: sum or rank a smaller pool)"
        )
    phi = np.asarray(tests[:], dtype=np.float64)
    if n < d:
        rows = np.asarray(train[:], dtype=np.float64)
        gram = rows @ rows.T
        lam = damping * float(np.trace(gram)) / d
        if not lam > 0:
            raise InfluenceError("method trak: the training sketches are all zero; there is no kernel to invert")
        gram[np.diag_indices(n)] += lam
        inner = cho_solve(cho_factor(gram, lower=True), rows @ phi.T)  # (n, n_test)
        return (phi - (rows.T @ inner).T) / lam, lam
    gram = gram_matrix(train)
    lam = damping * float(np.trace(gram)) / d
    if not lam > 0:
        raise InfluenceError("method trak: the training sketches are all zero; there is no kernel to invert")
    gram[np.diag_indices(d)] += lam
    return cho_solve(cho_factor(gram, lower=True), phi.T).T, lam


def feature_root(run_dir: Path, method: str) -> Path:
    """The run-like folder whose ``sketches/`` a method ranks: the representations for ``repsim``, the EK-FAC
    scores for ``ekfac``."""
    return Path(run_dir) / {"repsim": REPRESENTATIONS, "ekfac": EKFAC}.get(method, "")


def prepare_scores(method: str, tests: Sequence, trains: Sequence, normalization: str,
                   trak_damping: float) -> PreparedScores:
    """The test rows and normalization one mask is ranked with under ``method`` (per checkpoint)."""
    if method == "tracin":
        return PreparedScores(list(tests), normalization, {"method": "tracin"})
    if method == "repsim":
        return PreparedScores(list(tests), "cosine", {"method": "repsim"})
    if method == "ekfac":  # test rows hold the scores, training rows the identity: the dot product is the score
        return PreparedScores(list(tests), "dot", {"method": "ekfac"})
    if method == "trak":
        transformed, lams = [], []
        for test, train in zip(tests, trains):
            psi, lam = trak_transform(train, test, trak_damping)
            transformed.append(psi)
            lams.append(lam)
        return PreparedScores(transformed, "dot", {"method": "trak", "damping": trak_damping, "lambda": lams})
    raise InfluenceError(f"options: method must be one of {METHODS}, found {method!r}")



def method_sketches(run_dir: Path, method: str, condition: str, epochs: Sequence[int]) -> tuple[list, list] | None:
    """(test, train) sketches per checkpoint that ``method`` ranks for ``condition``; None when its folder lacks
    one of them (e.g. no representations written). Rows must be the gradient sketches' rows."""
    source = feature_root(run_dir, method)
    if not all(sketch_paths(source, e, condition, split)[1].is_file() for e in epochs for split in ("train", "test")):
        return None
    tests = [read_sketch(source, e, condition, "test") for e in epochs]
    trains = [read_sketch(source, e, condition, "train") for e in epochs]
    for split, found in (("test", tests), ("train", trains)):  # every checkpoint, every method: the same rows
        reference = read_sketch(run_dir, epochs[-1], condition, split).indices
        if any(not np.array_equal(s.indices, reference) for s in found):
            raise InfluenceError(f"{source / 'sketches'}: {split} rows differ between checkpoints or from "
                                 f"{Path(run_dir) / 'sketches'}'s (made by another analysis: run its stage again)")
    return tests, trains


def method_score_matrices(run_dir: Path, condition: str, epochs: Sequence[int], normalization: str = "cosine",
                          trak_damping: float = 0.1) -> dict[str, np.ndarray]:
    """Every method's whole (test × pool) score matrix over ``epochs`` whose inputs the run holds, rows and
    columns in the gradient sketches' order (``tracin`` under ``normalization``, the others as they rank)."""
    found = {}
    for method in METHODS:
        sketches = method_sketches(run_dir, method, condition, epochs)
        if sketches is None:
            continue
        tests, trains = sketches
        found[method] = score_matrix(method, [t.data for t in tests], [t.data for t in trains], normalization,
                                     trak_damping)
    return found


def score_matrix(method: str, tests: Sequence, trains: Sequence, normalization: str = "cosine",
                 trak_damping: float = 0.1) -> np.ndarray:
    """The whole (test × train) score matrix of a method, summed over checkpoints, float64: for pools small
    enough to hold (the planted control, references); the influence stage streams instead."""
    prepared = prepare_scores(method, [np.asarray(t) for t in tests], [np.asarray(r) for r in trains],
                              normalization, trak_damping)
    return tracin_scores(prepared.tests, [np.asarray(r) for r in trains], prepared.normalization)
