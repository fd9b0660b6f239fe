"""Head masks as named values (DESIGN.md): ``full``, ``<lang>``, ``random<seed>-<lang>``,
``union-<a>-<b>``, ``intersect-<a>-<b>``; and conditions that pair each test language
with a mask: ``full``, ``own``, ``random<seed>``, ``as-<lang>``, ``union-<a>-<b>``,
``intersect-<a>-<b>``. numpy only, so every stage (and a notebook) can use them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np


class MaskError(ValueError):
    """A mask file or name that cannot be used; the message names the file or name."""


def name_seed(*parts: object) -> int:
    """A 64-bit seed derived from names, stable across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def load_subnetwork(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The 0/1 L×H mask stored in a ``subnetworks/<lang>.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"subnetwork file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MaskError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict) or "mask" not in data:
        raise MaskError(f"{path}: expected a JSON object with key 'mask', found {type(data).__name__}")
    mask = np.asarray(data["mask"])
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        raise MaskError(f"{path}: key 'mask' must be a 2-d list of 0/1 (layers x heads), found shape {mask.shape}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise MaskError(f"{path}: mask has shape {tuple(mask.shape)}, the model has {tuple(shape)} (layers x heads)")
    return mask.astype(np.int8)


def load_subnetworks(directory: str | Path, languages: list[str], shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MaskError(f"subnetworks directory not found: {directory}")
    return {lang: load_subnetwork(directory / f"{lang}.json", shape) for lang in languages}


def shuffle_mask(mask: np.ndarray, seed: int, lang: str) -> np.ndarray:
    """``random<seed>-<lang>``: the language's mask with its heads permuted (same sparsity).

    Seeded from the name, so every stage and process draws the same random subnetwork.
    """
    rng = np.random.default_rng(name_seed("random", seed, lang))
    flat = mask.reshape(-1).copy()
    return rng.permutation(flat).reshape(mask.shape)


_RANDOM = re.compile(r"^random(\d+)-(.+)$")
_PAIR = re.compile(r"^(union|intersect)-([^-]+)-([^-]+)$")


def resolve_mask(name: str, subnetworks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The L×H mask a mask name stands for (``full`` is all ones)."""
    if name == "full":
        return np.ones(shape, dtype=np.int8)
    if name in subnetworks:
        return subnetworks[name]
    if m := _RANDOM.match(name):
        seed, lang = int(m.group(1)), m.group(2)
        return shuffle_mask(resolve_mask(lang, subnetworks, shape), seed, lang)
    if m := _PAIR.match(name):
        op, a, b = m.groups()
        ma, mb = resolve_mask(a, subnetworks, shape), resolve_mask(b, subnetworks, shape)
        return (np.maximum if op == "union" else np.minimum)(ma, mb).astype(np.int8)
    raise MaskError(
        f"unknown mask {name!r}: expected full, a language ({', '.join(sorted(subnetworks))}), "
        "random<seed>-<lang>, union-<a>-<b> or intersect-<a>-<b>"
    )


def condition_masks(condition: str, test_languages: list[str]) -> dict[str, str]:
    """Which mask each test language is evaluated (and attributed) under in a condition."""
    if condition == "full":
        return dict.fromkeys(test_languages, "full")
    if condition == "own":
        return {lang: lang for lang in test_languages}
    if m := re.fullmatch(r"random(\d+)", condition):
        return {lang: f"random{m.group(1)}-{lang}" for lang in test_languages}
    if m := re.fullmatch(r"as-(.+)", condition):
        return dict.fromkeys(test_languages, m.group(1))
    if m := _PAIR.match(condition):
        op, a, b = m.groups()
        return {lang: condition for lang in (a, b) if lang in test_languages}
    raise MaskError(
        f"unknown condition {condition!r}: expected full, own, random<seed>, as-<lang>, union-<a>-<b> or intersect-<a>-<b>"
    )
