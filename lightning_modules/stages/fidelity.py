"""``crossling analyze --stages fidelity``: how far the run's sketched rankings are from exact-gradient
ones, measured on a seeded sample at one checkpoint under one mask condition.

Reads ``<run>/checkpoints/epoch=<E>.ckpt`` (the last by default) and, for masked conditions,
``<run>/subnetworks/<lang>.json``; writes ``<run>/fidelity/fidelity.json`` (recall of the top-m
sets, Spearman, the per-language share error the report widens its intervals by), atomically.
The measurement itself is ``callbacks/fidelity_sample.py``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from analysis.atomic import write_json_atomic
from analysis.masks import condition_masks, load_subnetworks, resolve_mask
from analysis.projection_error import FIDELITY_FILE
from callbacks.checkpoints import CheckpointError, fingerprint, list_checkpoints, load_weights
from callbacks.fidelity_sample import (
    FidelityOptions,
    check_memory,
    compare_scores,
    sample_indices,
    sample_sizes,
    score_sample,
)
from callbacks.sketching import SketchOptions, get_sketcher, layer_parameter_count, resolve_precision

from .request import AnalyzeRequest


def run_fidelity_stage(request: AnalyzeRequest) -> Path:
    r = request
    return measure_fidelity(r.model, r.datamodule, r.run_dir, r.sketch, r.fidelity, r.subnetworks_dir)


def measure_fidelity(module, datamodule, run_dir: Path, sketch: SketchOptions, options: FidelityOptions,
                 subnetworks_dir: Path | None = None) -> Path:
    """Compare sketched with exact rankings on a sample; writes ``<run>/fidelity/fidelity.json`` (+ nothing
    else; atomically, so a stopped check leaves no file)."""
    run_dir = Path(run_dir)
    if sketch.kind == "representation":
        raise ValueError("sketch.kind: 'representation' holds no gradient for the fidelity stage to check against "
                         "exact gradients (run fidelity with the gradient sketch's options)")
    checkpoints = dict(list_checkpoints(run_dir))
    if not checkpoints:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no epoch=<E>.ckpt files (run crossling fit first)")
    epoch = max(checkpoints) if options.epoch is None else options.epoch
    if epoch not in checkpoints:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint for epoch {epoch} (found {sorted(checkpoints)})")
    model = module.model
    device = next(model.parameters()).device
    sketch = replace(sketch, precision=resolve_precision(sketch.precision, device))
    exact = get_sketcher(model, replace(sketch, kind="exact"))
    d, p = get_sketcher(model, sketch).dim, exact.dim
    n_train_data, n_test_data = len(datamodule.dataset("train")), len(datamodule.dataset("test"))
    n_train, n_test = sample_sizes(n_train_data, n_test_data, options)
    check_memory(n_train, n_test, options, d, p, max(layer_parameter_count(mod) for _, mod in exact.layers))
    load_weights(module, checkpoints[epoch])
    languages = list(datamodule.languages)
    shape = module.gates.shape
    mask_names = condition_masks(options.condition, languages)
    per_lang = None
    if any(name != "full" for name in mask_names.values()):
        subnetworks = load_subnetworks(subnetworks_dir or run_dir / "subnetworks", languages, shape)
        per_lang = {i: resolve_mask(mask_names[lang], subnetworks, shape) for i, lang in enumerate(languages)}
    test_idx = sample_indices(n_test_data, n_test, "test", options.seed)
    train_idx = sample_indices(n_train_data, n_train, "train", options.seed)
    m = options.m or max(1, round(0.05 * len(train_idx)))
    m = min(m, max(1, len(train_idx) // 4))
    scores = score_sample(module, datamodule, test_idx, train_idx, per_lang, sketch, options)
    result = compare_scores(scores.sketch, scores.exact, scores.train_langs, scores.test_langs, len(languages), m)
    result.update(epoch=epoch, checkpoint_fingerprint=fingerprint(checkpoints[epoch]), n_test=len(test_idx),
                  n_train=len(train_idx), d=d, p=p, test_chunks=scores.chunks,
                  projection=sketch.projection_record(), precision=sketch.precision, options=asdict(options))
    out = write_json_atomic(run_dir / FIDELITY_FILE, result)
    err = result["share_error_pp"]
    print(f"fidelity ({options.condition}, epoch {epoch}, {len(test_idx)} test x {len(train_idx)} train, m={m}): "
          f"recall pos {result['recall_pos']:.3f}, neg {result['recall_neg']:.3f}, spearman {result['spearman']:.3f}, "
          f"share error pos {err['pos']['mean']:.2f}/{err['pos']['max']:.2f} pp, "
          f"neg {err['neg']['mean']:.2f}/{err['neg']['max']:.2f} pp (mean/max) -> {out}", flush=True)
    return out
