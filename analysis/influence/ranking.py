"""Ranking one condition: which sketch files it pairs (the plan), checked compatible, streamed into top-m sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..masks import MaskError, condition_masks
from ..sketch_store import Sketch, check_compatible, list_epochs, read_sketch, run_languages, sketch_paths
from ..tracin import stream_top_k
from .methods import prepare_scores
from .options import InfluenceError, InfluenceOptions, MissingInputs
from .topk_file import TOPK_FORMAT, TopKFile

log = logging.getLogger(__name__)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Plan:
    condition: str
    epochs: list[int]
    languages: list[str]
    masks: dict[str, str]  # test language → mask
    groups: dict[str, list[str]]  # mask → test languages
    sketches: dict[tuple[int, str, str], Sketch] = field(default_factory=dict)
    inputs_key: str = ""


def plan_condition(run_dir: Path, condition: str, options: InfluenceOptions) -> _Plan:
    """Find and validate every sketch a condition needs; raise MissingInputs listing all that are absent."""
    run_dir = Path(run_dir)
    epochs = sorted(options.epochs) if options.epochs else list_epochs(run_dir)
    if not epochs:
        raise MissingInputs(condition, [run_dir / "sketches" / "epoch=<E>"])
    languages = run_languages(run_dir, epochs)
    if languages is None:
        raise MissingInputs(condition, [run_dir / "sketches" / "epoch=<E>" / "<mask>" / "<split>.json"])
    try:
        masks = condition_masks(condition, languages)
    except MaskError as err:
        raise InfluenceError(str(err)) from None
    if not masks:
        raise InfluenceError(
            f"condition {condition!r} pairs no test language of this run ({languages}) with a mask"
        )
    groups: dict[str, list[str]] = {}
    for lang, mask in masks.items():
        groups.setdefault(mask, []).append(lang)
    plan = _Plan(condition, epochs, languages, masks, groups)
    missing = []
    for epoch in epochs:
        for mask in groups:
            for split in ("test", "train"):
                missing += [p for p in sketch_paths(run_dir, epoch, mask, split) if not p.is_file()]
    if missing:
        raise MissingInputs(condition, missing)
    digest = []
    for epoch in epochs:
        for mask in groups:
            for split in ("test", "train"):
                sk = read_sketch(run_dir, epoch, mask, split)
                if sk.meta.get("languages", languages) != languages:
                    raise InfluenceError(
                        f"{sk.sidecar}: key 'languages' is {sk.meta['languages']}, other sketches have {languages}"
                    )
                plan.sketches[(epoch, mask, split)] = sk
                digest.append(
                    [
                        str(sk.sidecar.relative_to(run_dir)),
                        sha(sk.sidecar.read_bytes()),
                        sk.npy.stat().st_size,
                    ]
                )
    _check_compatible(plan)
    key = {
        "format": TOPK_FORMAT,
        "condition": condition,
        "epochs": epochs,
        "options": options.ranking_fields(),
        "files": digest,
    }
    plan.inputs_key = sha(json.dumps(key, sort_keys=True).encode())
    return plan


def _check_compatible(plan: _Plan) -> None:
    """Every sketch of a condition must share the projection; test and train of a checkpoint, the model."""
    check_compatible([(sk.sidecar, sk.meta) for sk in plan.sketches.values()])
    for epoch in plan.epochs:
        for mask in plan.groups:
            pair = [plan.sketches[(epoch, mask, split)] for split in ("test", "train")]
            check_compatible([(sk.sidecar, sk.meta) for sk in pair], same_model=True)


class RowView:
    """Rows of a (memory-mapped) array, selected lazily so a test chunk is read only when ranked."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (rows.size, base.shape[1])
        self.ndim = 2

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.base[self.rows[item]])


def rank_condition(run_dir: Path, plan: _Plan, options: InfluenceOptions) -> TopKFile:
    """Rank every test example of a condition against the training sketches of its mask."""
    dtype = np.float64 if options.precision == "float64" else np.float32
    parts = []
    method_records: dict[str, dict] = {}
    final = plan.epochs[-1]
    for mask, langs in plan.groups.items():
        tests = [plan.sketches[(e, mask, "test")] for e in plan.epochs]
        trains = [plan.sketches[(e, mask, "train")] for e in plan.epochs]
        rows_by_epoch = [np.flatnonzero(np.isin(t.langs, langs)) for t in tests]
        test_idx = tests[0].indices[rows_by_epoch[0]]
        if test_idx.size == 0:
            raise InfluenceError(
                f"{tests[0].sidecar}: holds no test examples of language(s) {langs} (condition {plan.condition!r})"
            )
        for t, rows in zip(tests[1:], rows_by_epoch[1:]):
            if not np.array_equal(t.indices[rows], test_idx):
                raise InfluenceError(
                    f"{t.sidecar}: key 'indices' selects other test examples than {tests[0].sidecar}"
                )
        train_idx = trains[0].indices
        for r in trains[1:]:
            if not np.array_equal(r.indices, train_idx):
                raise InfluenceError(f"{r.sidecar}: key 'indices' differs from {trains[0].sidecar}")
        log.info(
            "ranking %s: mask %s, %d test x %d train x %d checkpoints",
            plan.condition,
            mask,
            test_idx.size,
            train_idx.size,
            len(plan.epochs),
        )
        try:
            prepared = prepare_scores(
                options.method, [RowView(t.data, rows) for t, rows in zip(tests, rows_by_epoch)],
                [r.data for r in trains], options.normalization, options.trak_damping,
            )
            method_records[mask] = prepared.record
            ranked = stream_top_k(
                prepared.tests,
                [r.data for r in trains],
                m=options.m,
                normalization=prepared.normalization,
                lr_weights=options.lr_weights,
                per_checkpoint=options.per_checkpoint,
                train_block=options.train_block,
                test_block=options.test_block,
                memory_mb=options.memory_mb,
                dtype=dtype,
            )
        except ValueError as err:
            files = ", ".join(str(s.npy) for s in tests + trains)
            raise InfluenceError(
                f"condition {plan.condition!r}, mask {mask!r}: {err}; inputs: {files}"
            ) from None
        final_test = plan.sketches[(final, mask, "test")]
        rows_final = rows_by_epoch[-1]
        fm = final_test.meta
        part = {
            "test_indices": test_idx,
            "test_langs": final_test.langs[rows_final],
            "test_ids": np.asarray(fm["ids"], dtype=str)[rows_final],
            "test_labels": np.asarray(fm["labels"], dtype=np.int64)[rows_final],
            "test_pred": np.asarray(fm.get("pred", [-1] * fm["n"]), dtype=np.int64)[rows_final],
            "test_masks": np.full(test_idx.size, mask),
            "test_correct": np.asarray(fm["correct"], dtype=bool)[rows_final],
            "test_correct_by_epoch": np.stack(
                [np.asarray(t.meta["correct"], dtype=bool)[rows] for t, rows in zip(tests, rows_by_epoch)]
            ),
            "pos_idx": train_idx[ranked.pos.idx],
            "pos_score": ranked.pos.score,
            "neg_idx": train_idx[ranked.neg.idx],
            "neg_score": ranked.neg.score,
        }
        m_eff = ranked.pos.idx.shape[1]
        for sign, tops in (("pos", ranked.pos_by_ckpt), ("neg", ranked.neg_by_ckpt)):
            if tops:
                part[f"{sign}_idx_by_epoch"] = np.stack([train_idx[t.idx] for t in tops])
                part[f"{sign}_score_by_epoch"] = np.stack([t.score for t in tops])
            else:
                part[f"{sign}_idx_by_epoch"] = np.zeros((0, test_idx.size, m_eff), np.int64)
                part[f"{sign}_score_by_epoch"] = np.zeros((0, test_idx.size, m_eff))
        parts.append(part)
    arrays = {}
    for key in parts[0]:
        axis = 1 if key.endswith("_by_epoch") else 0
        arrays[key] = np.concatenate([p[key] for p in parts], axis=axis)
    order = np.argsort(arrays["test_indices"], kind="stable")
    for key in list(arrays):
        arrays[key] = np.take(arrays[key], order, axis=1 if key.endswith("_by_epoch") else 0)
    arrays.update(_train_metadata(plan))
    arrays["epochs"] = np.asarray(plan.epochs, dtype=np.int64)
    any_sketch = next(iter(plan.sketches.values()))
    meta = {
        "format": TOPK_FORMAT,
        "condition": plan.condition,
        "languages": plan.languages,
        "epochs": plan.epochs,
        "masks": plan.masks,
        "options": options.ranking_fields(),
        "m": int(arrays["pos_idx"].shape[1]),
        "d": any_sketch.meta["d"],
        "projection": any_sketch.meta.get("projection"),
        "inputs_key": plan.inputs_key,
        "method": method_records,  # per mask: the method and what it chose (TRAK's λ per checkpoint)
    }
    return TopKFile(meta, arrays)


def _train_metadata(plan: _Plan) -> dict[str, np.ndarray]:
    """Union of the training examples over the condition's masks (final epoch), checked for agreement."""
    final = plan.epochs[-1]
    by_index: dict[int, tuple[str, str, int]] = {}
    for mask in plan.groups:
        sk = plan.sketches[(final, mask, "train")]
        for i, lang, id_, label in zip(
            sk.meta["indices"], sk.meta["langs"], sk.meta["ids"], sk.meta["labels"]
        ):
            row = (str(lang), str(id_), int(label))
            if by_index.setdefault(int(i), row) != row:
                raise InfluenceError(
                    f"{sk.sidecar}: training example {i} is {row}, another mask's sketch says {by_index[int(i)]}"
                )
    keys = sorted(by_index)
    return {
        "train_indices": np.asarray(keys, dtype=np.int64),
        "train_langs": np.asarray([by_index[k][0] for k in keys], dtype=str),
        "train_ids": np.asarray([by_index[k][1] for k in keys], dtype=str),
        "train_labels": np.asarray([by_index[k][2] for k in keys], dtype=np.int64),
    }

