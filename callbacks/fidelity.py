"""How far the sketches' TracIn rankings are from exact-gradient ones (the ``fidelity`` stage).

On a seeded sample of test and training examples at one checkpoint and one mask, the exact
per-example gradients of the sketched layers are compared with their projections: recall@m
of the top-m most positive and most negative sets, Spearman correlation of the scores, and
the largest change of a language-contribution cell (percentage points). Exact gradients are
streamed: only the test side (n_test × p) is held, each training batch is scored and dropped,
so the check scales to a few hundred test examples of any model whose p × n_test fits in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Subset

from analysis.contributions import language_shares, mean_matrix
from analysis.masks import condition_masks, load_subnetworks, name_seed, resolve_mask
from analysis.tracin import normalize, rank_top_k
from datamodules.base import make_collate

from .checkpoints import fingerprint, list_checkpoints, load_weights
from .sketching import SketchOptions, sketch_batch, sketching_mode


@dataclass
class FidelityOptions:
    """The sample the fidelity check runs on.

    Args:
        n_test: test examples (spread over languages by a seeded draw).
        n_train: training examples ranked for each test example (None: all).
        m: size of the compared top-m sets (capped at a quarter of n_train).
        condition: mask condition the gradients are taken under (``full``, ``own``, ...).
        epoch: checkpoint to use (None: the last).
        normalization: score normalisation (as in the influence stage).
        batch_size: examples per backward pass.
        seed: sample seed.
    """

    n_test: int = 100
    n_train: int | None = 2000
    m: int = 100
    condition: str = "full"
    epoch: int | None = None
    normalization: str = "cosine"
    batch_size: int = 16
    seed: int = 0


def _sample(n: int, k: int | None, *names) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng(name_seed("fidelity", *names))
    return np.sort(rng.choice(n, size=k, replace=False))


def _batches(datamodule, split: str, indices: np.ndarray, batch_size: int):
    dataset = datamodule.dataset(split)
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size,
                        collate_fn=make_collate(datamodule.tokenizer.pad_token_id))
    yield from loader


def _head_masks(langs: torch.Tensor, per_lang: dict[int, np.ndarray] | None) -> torch.Tensor | None:
    if per_lang is None:
        return None
    return torch.stack([torch.as_tensor(per_lang[int(lang)], dtype=torch.float32) for lang in langs])


def run_fidelity(module, datamodule, run_dir: Path, sketch: SketchOptions, options: FidelityOptions,
                 subnetworks_dir: Path | None = None) -> Path:
    """Compare sketched with exact rankings on a sample; writes ``<run>/fidelity/fidelity.json`` (+ .csv)."""
    run_dir = Path(run_dir)
    checkpoints = dict(list_checkpoints(run_dir))
    if not checkpoints:
        from .checkpoints import CheckpointError

        raise CheckpointError(f"{run_dir / 'checkpoints'}: no epoch=<E>.ckpt files (run crossling fit first)")
    epoch = max(checkpoints) if options.epoch is None else options.epoch
    load_weights(module, checkpoints[epoch])
    languages = list(datamodule.languages)
    shape = module.gates.shape
    mask_names = condition_masks(options.condition, languages)
    per_lang = None
    if any(name != "full" for name in mask_names.values()):
        subnetworks = load_subnetworks(subnetworks_dir or run_dir / "subnetworks", languages, shape)
        per_lang = {i: resolve_mask(mask_names[lang], subnetworks, shape) for i, lang in enumerate(languages)}
    exact = replace(sketch, kind="exact")
    test_idx = _sample(len(datamodule.dataset("test")), options.n_test, "test", options.seed)
    train_idx = _sample(len(datamodule.dataset("train")), options.n_train, "train", options.seed)
    model = module.model
    test_exact, test_sketch, test_langs = [], [], []
    with sketching_mode(model):
        for batch in _batches(datamodule, "test", test_idx, options.batch_size):
            masks = _head_masks(batch["langs"], per_lang)
            test_exact.append(sketch_batch(model, module.gates, batch, masks, exact)[0].double())
            test_sketch.append(sketch_batch(model, module.gates, batch, masks, sketch)[0].double())
            test_langs.append(batch["langs"])
        test_exact_n = torch.as_tensor(normalize(torch.cat(test_exact).numpy(), options.normalization, "test"))
        test_sketch_n = normalize(torch.cat(test_sketch).numpy(), options.normalization, "test")
        exact_scores, train_sketch, train_langs = [], [], []
        for batch in _batches(datamodule, "train", train_idx, options.batch_size):
            masks = _head_masks(batch["langs"], per_lang)
            grads = sketch_batch(model, module.gates, batch, masks, exact)[0].double().numpy()
            exact_scores.append((test_exact_n @ torch.as_tensor(normalize(grads, options.normalization, "train")).T).numpy())
            train_sketch.append(sketch_batch(model, module.gates, batch, masks, sketch)[0].double().numpy())
            train_langs.append(batch["langs"].numpy())
    exact_scores = np.concatenate(exact_scores, axis=1)
    sketch_scores = test_sketch_n @ normalize(np.concatenate(train_sketch), options.normalization, "train").T
    result = compare_scores(sketch_scores, exact_scores, np.concatenate(train_langs), torch.cat(test_langs).numpy(),
                            len(languages), min(options.m, max(1, len(train_idx) // 4)))
    result.update(epoch=epoch, checkpoint_fingerprint=fingerprint(checkpoints[epoch]), n_test=len(test_idx),
                  n_train=len(train_idx), projection=sketch.projection_record(), options=asdict(options))
    out = run_dir / "fidelity" / "fidelity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"fidelity ({options.condition}, epoch {epoch}, {len(test_idx)} test x {len(train_idx)} train, "
          f"m={result['m']}): recall pos {result['recall_pos']:.3f}, neg {result['recall_neg']:.3f}, "
          f"spearman {result['spearman']:.3f}, max contribution diff {result['max_contribution_diff_pp']:.2f} pp")
    return out


def compare_scores(approx: np.ndarray, exact: np.ndarray, train_langs: np.ndarray, test_langs: np.ndarray,
                   n_languages: int, m: int) -> dict:
    """Recall@m (pos/neg), mean per-row Spearman and the largest contribution-cell change (pp)."""
    out: dict = {"m": int(m)}
    for sign, largest in (("pos", True), ("neg", False)):
        a, e = rank_top_k(approx, m, largest).idx, rank_top_k(exact, m, largest).idx
        out[f"recall_{sign}"] = float(np.mean([len(set(x) & set(y)) / m for x, y in zip(a, e)]))
        share_a, _ = mean_matrix(language_shares(a, train_langs, n_languages), test_langs, n_languages)
        share_e, _ = mean_matrix(language_shares(e, train_langs, n_languages), test_langs, n_languages)
        out[f"max_contribution_diff_pp_{sign}"] = float(np.nanmax(np.abs(share_a - share_e)))
    out["max_contribution_diff_pp"] = max(out["max_contribution_diff_pp_pos"], out["max_contribution_diff_pp_neg"])
    out["spearman"] = float(np.mean([spearmanr(x, y).statistic for x, y in zip(approx, exact)]))
    return out
