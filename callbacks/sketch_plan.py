"""What the sketch stage computes and where it goes: the masks each condition needs, the passes over
a split (one per training mask, rounds of per-example masks for the test set), the training pool,
and the identity every sketch file records (``sketches/epoch=<E>/<mask>/<split>``).

Which masks: training examples are sketched once under every mask any requested condition
uses; test examples of language L under ``condition_masks(C, languages)[L]`` for each condition
C. A test pass gives each example its own language's mask (per-example B×L×H gates), so one pass
over the test set serves every language; rounds of passes cover languages needing several masks.
Masks equal as arrays are sketched once (``equal_mask_aliases``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from analysis.masks import MaskError, condition_masks, load_subnetwork, name_seed, resolve_mask
from analysis.sketch_store import FORMAT, sketch_paths

from .sketch_writer import SketchJob, SketchTarget, write_shared_target
from .sketching import SketchOptions

SPLITS = ("train", "test")


def plan_masks(conditions: list[str], languages: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(masks for the training set, per test language the masks its conditions pair it with)."""
    if not conditions:
        raise MaskError(
            "no conditions given: expected some of full, own, random<seed>, as-<lang>, union-<a>-<b>"
        )
    per_lang: dict[str, set[str]] = {lang: set() for lang in languages}
    for condition in conditions:
        for lang, mask in condition_masks(condition, languages).items():
            per_lang[lang].add(mask)
    order = _mask_order
    train = sorted({m for masks in per_lang.values() for m in masks}, key=order)
    return train, {lang: sorted(masks, key=order) for lang, masks in per_lang.items() if masks}


def _mask_order(name: str) -> tuple[int, str]:
    return (0 if name == "full" else 1, name)


def equal_mask_aliases(names: list[str], head_masks: dict[str, np.ndarray | None]) -> dict[str, str]:
    """mask name -> the earlier name (in mask order) whose mask is equal as an array, for every mask
    that has one; ``full`` counts as all ones (an all-ones gate is bit-identical to no gate).

    Two languages whose subnetworks coincide, or a union equal to one of its parts, gate the model
    identically, so their sketches are the same numbers: each is computed once and shared.
    """
    aliases: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray | None]] = []
    for name in sorted(names, key=_mask_order):
        mask = head_masks[name]
        for other, other_mask in seen:
            if _same_gating(mask, other_mask):
                aliases[name] = other
                break
        else:
            seen.append((name, mask))
    return aliases


def _same_gating(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        other = b if a is None else a
        return other is None or bool((np.asarray(other) == 1).all())
    return np.array_equal(np.asarray(a), np.asarray(b))


def mask_rounds(test_masks: dict[str, list[str]]) -> list[dict[str, str]]:
    """Passes over the test set, as language -> mask: every mask falls in exactly one pass with all
    the languages paired with it (its file is written once), and no language needs two masks in
    one pass (each example has one mask per pass)."""
    languages_of: dict[str, list[str]] = {}
    for lang, masks in test_masks.items():
        for mask in masks:
            languages_of.setdefault(mask, []).append(lang)
    rounds: list[dict[str, str]] = []
    for mask in sorted(languages_of, key=_mask_order):
        langs = languages_of[mask]
        for assignment in rounds:
            if not any(lang in assignment for lang in langs):
                break
        else:
            assignment = {}
            rounds.append(assignment)
        assignment.update(dict.fromkeys(langs, mask))
    return rounds


def referenced_languages(mask: str, languages: list[str]) -> list[str]:
    """The languages whose subnetwork file a mask name needs."""
    if mask == "full":
        return []
    if mask in languages:
        return [mask]
    if m := re.fullmatch(r"random\d+-(.+)", mask):
        return referenced_languages(m.group(1), languages)
    if m := re.fullmatch(r"(?:union|intersect)-([^-]+)-([^-]+)", mask):
        return [m.group(1), m.group(2)]
    return []


def resolve_head_masks(
    masks: list[str], languages: list[str], shape: tuple[int, int], subnetworks_dir: Path
) -> dict[str, np.ndarray | None]:
    """mask name -> L×H array (None for ``full``: no gating), loading only the files needed."""
    subnetworks = {}
    for mask in masks:
        for lang in referenced_languages(mask, languages):
            if lang not in subnetworks:
                path = subnetworks_dir / f"{lang}.json"
                if not path.is_file():
                    raise MaskError(
                        f"mask {mask!r} needs the subnetwork file {path}, which does not exist "
                        "(run the subnetworks stage first, or drop the conditions that use it)"
                    )
                subnetworks[lang] = load_subnetwork(path, shape)
    return {mask: None if mask == "full" else resolve_mask(mask, subnetworks, shape) for mask in masks}


def target_identity(
    split: str,
    mask: str,
    epoch: int,
    options: SketchOptions,
    layers: list[str],
    d: int,
    model_fingerprint: str,
    languages: list[str],
) -> dict:
    return {
        "format": FORMAT,
        "split": split,
        "mask": mask,
        "epoch": int(epoch),
        "d": int(d),
        "dtype": "float32",
        "projection": options.projection_record(),
        "layers": list(layers),
        "model_fingerprint": model_fingerprint,
        "languages": list(languages),
        "attention": options.attention,
        "precision": options.precision,
    }


def train_pool(dataset, per_language: int | None) -> np.ndarray | None:
    """Dataset indices of the training examples to sketch: per language, the ``per_language`` items
    whose ids hash lowest (a seeded draw that needs no RNG state), so a parallel task keeps the same
    items in every language, and a larger pool contains a smaller one. None: every example."""
    if per_language is None:
        return None
    by_lang: dict[int, list[tuple[int, int]]] = {}
    for e in dataset.examples:
        by_lang.setdefault(e.lang, []).append((name_seed("influence-pool", str(e.record.id)), e.index))
    chosen = [index for rows in by_lang.values() for _, index in sorted(rows)[:per_language]]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def split_rows(dataset, pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(language codes, dataset indices) of a split's examples, only those in ``pool`` when given."""
    langs = np.array([e.lang for e in dataset.examples], dtype=np.int64)
    indices = np.array([e.index for e in dataset.examples], dtype=np.int64)
    if pool is None:
        return langs, indices
    keep = np.isin(indices, pool)
    return langs[keep], indices[keep]


def make_jobs(
    split: str,
    epoch: int,
    run_dir: Path,
    dataset,
    languages: list[str],
    train_masks: list[str],
    test_masks: dict[str, list[str]],
    head_masks: dict,
    identity,
    pool: np.ndarray | None = None,
) -> list[SketchJob]:
    """The passes over one split: one per mask for train, one per round for test. ``pool``
    restricts the training examples (``train_pool``)."""
    all_langs, all_indices = split_rows(dataset, pool if split == "train" else None)
    if split == "train":
        rounds = [dict.fromkeys(languages, mask) for mask in train_masks]
    else:
        rounds = mask_rounds(test_masks)
    jobs = []
    for assignment in rounds:
        lang_masks = {languages.index(lang): mask for lang, mask in assignment.items()}
        targets = {}
        for mask in sorted(set(lang_masks.values()), key=_mask_order):
            codes = [i for i, m in lang_masks.items() if m == mask]
            indices = np.sort(all_indices[np.isin(all_langs, codes)])
            npy, _ = sketch_paths(run_dir, epoch, mask, split)
            targets[mask] = SketchTarget(npy, identity(split, mask), indices)
        label = f"epoch={epoch} {split} " + ",".join(targets)
        jobs.append(
            SketchJob(
                split,
                epoch,
                targets,
                lang_masks,
                {m: head_masks[m] for m in targets},
                dataset,
                list(languages),
                label,
            )
        )
    return jobs


def share_equal_masks(
    aliases: dict[str, str], split: str, epoch: int, run_dir: Path, dataset, languages, test_masks, identity,
    pool: np.ndarray | None = None,
) -> list[Path]:
    """Write every aliased mask's file of one split from its equal mask's file (see ``equal_mask_aliases``)."""
    all_langs, all_indices = split_rows(dataset, pool)
    written = []
    for alias, canonical in aliases.items():
        if split == "train":
            codes = list(range(len(languages)))
        else:
            codes = [languages.index(lang) for lang, masks in test_masks.items() if alias in masks]
        if not codes:
            continue
        npy, _ = sketch_paths(run_dir, epoch, alias, split)
        target = SketchTarget(npy, identity(split, alias), np.sort(all_indices[np.isin(all_langs, codes)]))
        if not target.is_finished():
            write_shared_target(target, sketch_paths(run_dir, epoch, canonical, split)[0], canonical)
        written.append(npy)
    return written
