"""How far the sketches' TracIn rankings are from exact-gradient ones, on a sample: the measurement the
``fidelity`` stage (``lightning_modules/stages/fidelity.py``) runs.

On a seeded sample of test and training examples at one checkpoint and one mask, the exact
per-example gradients of the sketched layers are compared with their projections: recall of the
top-m most positive and most negative sets, Spearman correlation of the scores, and the error of
the per-language shares of those sets (mean and largest cell, percentage points). The report
widens every interval it marks by that share error, so a change smaller than the projection's
own error is never reported as a finding.

Memory stays bounded whatever the sample: the test side's exact gradients are held in chunks of at
most ``max_exact_gb`` (each chunk streams the training sample again), written in place by the backward
pass; a training example's exact gradient is never held whole, but scored one layer at a time as the
backward pass forms it (``Sketcher.dot_exact``). So the cost grows with n_test / chunk, memory does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Subset

from analysis.contributions import language_shares, mean_matrix
from analysis.masks import name_seed
from analysis.tracin import is_unit_normalized, normalize, rank_top_k
from datamodules.base import make_collate

from .sketching import SketchOptions, get_sketcher, sketch_batch, sketching_mode


class FidelityError(ValueError):
    """A fidelity request this run cannot serve (sample larger than the data, memory, ...)."""


@dataclass
class FidelityOptions:
    """The sample the fidelity check runs on.

    Args:
        n_test: test examples (a seeded draw over all languages; None: 40, or all when fewer).
        n_train: training examples ranked for each test example (None: 500, or all when fewer).
            A number larger than the run's split is refused.
        m: size of the compared top-m sets (None: 5 % of n_train, the demo's share of its pool).
        condition: mask condition the gradients are taken under (``full``, ``own``, ...).
        epoch: checkpoint to use (None: the last).
        normalization: score normalisation (as in the influence stage).
        batch_size: examples per backward pass.
        max_exact_gb: memory for the test side's exact gradients (GiB); more test examples are taken in chunks,
            each streaming the training sample again (e5-small: 86 MB an example, so 2 GiB holds 24).
        seed: sample seed.
    """

    n_test: int | None = None
    n_train: int | None = None
    m: int | None = None
    condition: str = "full"
    epoch: int | None = None
    normalization: str = "cosine"
    batch_size: int = 16
    max_exact_gb: float = 2.0
    seed: int = 0


def sample_indices(n: int, k: int | None, *names) -> np.ndarray:
    """``k`` of ``range(n)``, ascending, drawn from a seed derived from ``names`` (all when k is None)."""
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng(name_seed("fidelity", *names))
    return np.sort(rng.choice(n, size=k, replace=False))


def _batches(datamodule, split: str, indices: np.ndarray, batch_size: int):
    dataset = datamodule.dataset(split)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size,
                        collate_fn=make_collate(datamodule.pad_token_id))
    yield from loader


def _head_masks(langs: torch.Tensor, per_lang: dict[int, np.ndarray] | None) -> torch.Tensor | None:
    if per_lang is None:
        return None
    return torch.stack([torch.as_tensor(per_lang[int(lang)], dtype=torch.float32) for lang in langs])


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


DEFAULT_SAMPLE = {"n_test": 40, "n_train": 500}


def sample_sizes(n_train_data: int, n_test_data: int, options: FidelityOptions) -> tuple[int, int]:
    """(n_train, n_test) of the sample; a requested size the run's split cannot give is refused."""
    sizes = {}
    for name, wanted, have in (("n_train", options.n_train, n_train_data), ("n_test", options.n_test, n_test_data)):
        if wanted is None:
            sizes[name] = min(DEFAULT_SAMPLE[name], have)
        elif 1 <= wanted <= have:
            sizes[name] = wanted
        else:
            split = name.split("_")[1]
            raise FidelityError(f"fidelity.{name}={wanted}: the run's {split} split has {have} examples (give 1..{have})")
    return sizes["n_train"], sizes["n_test"]


def exact_chunk_size(n_test: int, options: FidelityOptions, p: int) -> int:
    """Test examples whose exact gradients are held at once (float32, ``max_exact_gb`` at most)."""
    return max(1, min(n_test, int(options.max_exact_gb * 2**30 // (4 * p))))


def check_memory(n_train: int, n_test: int, options: FidelityOptions, d: int, p: int, largest_layer: int) -> None:
    """Refuse, before any work, a sample memory cannot hold (one line)."""
    # the sketches of the whole sample (float64), one chunk of test gradients, and one layer's exact
    # gradients for a batch (formed, then scored)
    need = 8 * d * (n_train + n_test) + 4 * p * exact_chunk_size(n_test, options, p) \
        + 2 * 4 * largest_layer * options.batch_size
    available = _available_bytes()
    if available is not None and need > 0.8 * available:
        raise FidelityError(
            f"fidelity with d={d} and p={p} needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is "
            "available: lower fidelity.max_exact_gb, sketch.k, fidelity.n_train or fidelity.batch_size"
        )
    if 4 * p > options.max_exact_gb * 2**30:
        raise FidelityError(
            f"fidelity.max_exact_gb={options.max_exact_gb} cannot hold one test example's exact gradient "
            f"({4 * p / 2**30:.2f} GiB for p={p}); give at least {4 * p / 2**30:.2f}"
        )


def scale_rows_(x: torch.Tensor, normalization: str, side: str) -> torch.Tensor:
    """``x`` scaled in place as the influence stage normalises this side (norms summed in float64, one row
    at a time: ``vector_norm(x, dtype=float64)`` makes a float64 copy of the whole matrix first, which
    for the e5 demo's held test gradients was 4 GB on top of their 2)."""
    if is_unit_normalized(normalization, side):
        norms = torch.stack([torch.linalg.vector_norm(row, dtype=torch.float64) for row in x]) if len(x) \
            else torch.zeros(0, dtype=torch.float64)
        scales = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        x.mul_(scales.to(x.dtype)[:, None])
    return x


@dataclass
class SampleScores:
    """TracIn scores of a sample at one checkpoint, (n_test, n_train), from sketches and from exact gradients."""

    sketch: np.ndarray
    exact: np.ndarray
    train_langs: np.ndarray
    test_langs: np.ndarray
    chunks: int


def score_sample(module, datamodule, test_idx: np.ndarray, train_idx: np.ndarray,
                 per_lang: dict[int, np.ndarray] | None, sketch: SketchOptions, options: FidelityOptions) -> SampleScores:
    """Score every sampled test example against every sampled training example, twice: from the
    sketches and from exact per-example gradients, the test side held ``max_exact_gb`` at a time."""
    model = module.model
    exact = get_sketcher(model, replace(sketch, kind="exact"))
    p = exact.dim
    chunk = exact_chunk_size(len(test_idx), options, p)

    def sketches(batch) -> np.ndarray:
        masks = _head_masks(batch["langs"], per_lang)
        return sketch_batch(model, module.gates, batch, masks, sketch)[0].double().cpu().numpy()

    with sketching_mode(model):
        test_sketch, test_langs = [], []
        for batch in _batches(datamodule, "test", test_idx, options.batch_size):
            test_sketch.append(sketches(batch))
            test_langs.append(batch["langs"].cpu().numpy())
        train_sketch, train_langs = [], []
        exact_scores = np.zeros((len(test_idx), len(train_idx)))
        train_unit = is_unit_normalized(options.normalization, "train")
        for start in range(0, len(test_idx), chunk):
            part = test_idx[start : start + chunk]
            held = torch.zeros((len(part), p), dtype=torch.float32)  # written in place: no second copy
            row = 0
            for batch in _batches(datamodule, "test", part, options.batch_size):
                size = len(batch["labels"])
                exact(model, module.gates, batch, _head_masks(batch["langs"], per_lang), out=held[row : row + size])
                row += size
            scale_rows_(held, options.normalization, "test")
            col = 0
            for batch in _batches(datamodule, "train", train_idx, options.batch_size):
                dots, squares = exact.dot_exact(model, module.gates, batch, _head_masks(batch["langs"], per_lang),
                                                held)
                if train_unit:  # a zero gradient scores 0, as the influence stage's row_scales says
                    norms = squares.sqrt()
                    dots = torch.where(norms[:, None] > 0, dots / norms.clamp_min(1e-300)[:, None], 0.0)
                exact_scores[start : start + len(part), col : col + len(dots)] = dots.T.numpy()
                col += len(dots)
                if start == 0:
                    train_sketch.append(sketches(batch))
                    train_langs.append(batch["langs"].cpu().numpy())
            del held
    test_n = normalize(np.concatenate(test_sketch), options.normalization, "test")
    sketch_scores = test_n @ normalize(np.concatenate(train_sketch), options.normalization, "train").T
    return SampleScores(sketch_scores, exact_scores, np.concatenate(train_langs), np.concatenate(test_langs),
                        math.ceil(len(test_idx) / chunk))


def compare_scores(approx: np.ndarray, exact: np.ndarray, train_langs: np.ndarray, test_langs: np.ndarray,
                   n_languages: int, m: int) -> dict:
    """Recall of the exact top-m sets (pos/neg), mean per-row Spearman, and the error of the per-language
    shares of the top-m sets (test × train language cells, pp): ``share_error_pp[sign]`` = mean and max."""
    out: dict = {"m": int(m), "share_error_pp": {}}
    for sign, largest in (("pos", True), ("neg", False)):
        a, e = rank_top_k(approx, m, largest).idx, rank_top_k(exact, m, largest).idx
        out[f"recall_{sign}"] = float(np.mean([len(set(x) & set(y)) / m for x, y in zip(a, e)]))
        share_a, _ = mean_matrix(language_shares(a, train_langs, n_languages), test_langs, n_languages)
        share_e, _ = mean_matrix(language_shares(e, train_langs, n_languages), test_langs, n_languages)
        diff = np.abs(share_a - share_e)
        out["share_error_pp"][sign] = {"mean": float(np.nanmean(diff)), "max": float(np.nanmax(diff))}
        out[f"max_contribution_diff_pp_{sign}"] = out["share_error_pp"][sign]["max"]
    out["max_contribution_diff_pp"] = max(out["max_contribution_diff_pp_pos"], out["max_contribution_diff_pp_neg"])
    out["spearman"] = float(np.mean([spearmanr(x, y).statistic for x, y in zip(approx, exact)]))
    return out
