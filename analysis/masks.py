"""Head masks as named values (DESIGN.md): ``full``, ``<lang>``, ``random<seed>-<lang>``,
``union-<a>-<b>``, ``intersect-<a>-<b>``; and conditions that pair each test language
with a mask: ``full``, ``own``, ``random<seed>``, ``as-<lang>``, ``union-<a>-<b>``,
``intersect-<a>-<b>``. numpy only, so every stage (and a notebook) can use them.

A mask is an L×H array of 0/1 (layers × heads); 1 means the head is enabled, so a
language's subnetwork is the set of its mask's ones.
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


def _read_subnetwork(path: Path) -> dict:
    if not path.is_file():
        raise MaskError(f"subnetwork file not found: {path} (written by `crossling subnetworks`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MaskError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise MaskError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not isinstance(data, dict) or "mask" not in data:
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise MaskError(f"{path}: expected a JSON object with key 'mask', found {found}")
    return data


def check_mask(mask: object, shape: tuple[int, int] | None, where: str) -> np.ndarray:
    """``mask`` as an int8 L×H array of 0/1, or a MaskError that says ``where`` it came from."""
    try:
        arr = np.asarray(mask)
    except ValueError:  # ragged nested lists
        raise MaskError(f"{where}: mask must be a rectangular 2-d list of 0/1 (layers x heads)") from None
    if arr.ndim != 2 or arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
        raise MaskError(
            f"{where}: mask must be a 2-d list of 0/1 (layers x heads), found shape {arr.shape} of {arr.dtype}"
        )
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise MaskError(
            f"{where}: mask has shape {tuple(arr.shape)}, the model has {tuple(shape)} (layers x heads)"
        )
    return arr.astype(np.int8)


def load_subnetwork(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The 0/1 L×H mask stored in a ``subnetworks/<lang>.json`` file."""
    path = Path(path)
    return check_mask(_read_subnetwork(path)["mask"], shape, f"{path}: key 'mask'")


def load_subnetworks(
    directory: str | Path, languages: list[str], shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Every language's mask from ``<directory>/<lang>.json``; all must share one shape.

    Without ``shape``, the first file's shape is the reference, so a mix of masks from
    models of different sizes is caught here, naming the odd file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MaskError(f"subnetworks directory not found: {directory}")
    masks: dict[str, np.ndarray] = {}
    for lang in languages:
        path = directory / f"{lang}.json"
        data = _read_subnetwork(path)
        if "language" in data and data["language"] != lang:
            raise MaskError(f"{path}: key 'language' is {data['language']!r}, expected {lang!r} (file name)")
        masks[lang] = check_mask(data["mask"], shape, f"{path}: key 'mask'")
        if shape is None:
            shape = masks[lang].shape
    return masks


def shuffle_mask(mask: np.ndarray, seed: int, lang: str) -> np.ndarray:
    """``random<seed>-<lang>``: the language's mask with its heads permuted (same sparsity).

    Seeded from the name, so every stage and process draws the same random subnetwork.
    """
    rng = np.random.default_rng(name_seed("random", seed, lang))
    flat = np.asarray(mask).reshape(-1).copy()
    return rng.permutation(flat).reshape(np.shape(mask)).astype(np.int8)


_RANDOM = re.compile(r"^random(\d+)-(.+)$")
_PAIR = re.compile(r"^(union|intersect)-([^-]+)-([^-]+)$")


def resolve_mask(name: str, subnetworks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The L×H mask a mask name stands for (``full`` is all ones); always a fresh int8 array."""
    if name == "full":
        return np.ones(shape, dtype=np.int8)
    if name in subnetworks:
        return check_mask(subnetworks[name], shape, f"subnetwork {name!r}").copy()
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
    """Which mask each test language is evaluated (and attributed) under in a condition.

    ``union-<a>-<b>`` / ``intersect-<a>-<b>`` pair only test languages a and b with the
    composed mask (the paper's Fig 19); naming neither of the test languages is an error.
    """
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
        paired = {lang: condition for lang in (a, b) if lang in test_languages}
        if not paired:
            raise MaskError(
                f"condition {condition!r}: neither {a!r} nor {b!r} is a test language ({test_languages})"
            )
        return paired
    raise MaskError(
        f"unknown condition {condition!r}: expected full, own, random<seed>, as-<lang>, union-<a>-<b> or intersect-<a>-<b>"
    )
