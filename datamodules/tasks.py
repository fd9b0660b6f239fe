"""What each task is: its languages, text fields, label mapping and whether it is parallel.

Label mapping lives here, in one place, because every source (bundled, hub, local) must
produce the same binary labels the paper uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _pawsx_label(value: Any) -> int | None:
    if isinstance(value, bool):
        raise ValueError(f"expected 0 or 1, found {value!r}")
    if isinstance(value, int | str) and str(value).strip() in ("0", "1"):
        return int(value)
    raise ValueError(f"expected 0 or 1, found {value!r}")


_XNLI_STRINGS = {"entailment": 1, "neutral": 0, "contradiction": 0}
# The hub's XNLI uses 0 = entailment, 1 = neutral, 2 = contradiction.
_XNLI_INTS = {0: 1, 1: 0, 2: 0}


def _xnli_label(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() in _XNLI_STRINGS:
        return _XNLI_STRINGS[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in _XNLI_INTS:
        return _XNLI_INTS[value]
    raise ValueError(
        f"expected one of entailment/neutral/contradiction or 0/1/2, found {value!r}"
    )


def _marc_label(value: Any) -> int | None:
    numeric = isinstance(value, int) and not isinstance(value, bool)
    if not (numeric or isinstance(value, str) and value.strip().isdigit()) or int(value) not in range(1, 6):
        raise ValueError(f"expected stars 1-5, found {value!r}")
    stars = int(value)
    if stars == 3:
        return None  # neutral reviews are dropped, as in the paper
    return 0 if stars <= 2 else 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    default_languages: tuple[str, ...]
    known_languages: tuple[str, ...]
    text_fields: tuple[str, ...]  # one or two fields fed to the tokenizer as a pair
    label_field: str
    map_label: Callable[[Any], int | None]
    parallel: bool  # the same item ids exist in every language
    hub_root: str | None  # parquet export on the HuggingFace hub (<root>/<lang>/<split>-*.parquet)
    id_field: str | None  # None: the row number within the split is the id
    bundled: bool


TASKS: dict[str, TaskSpec] = {
    "pawsx": TaskSpec(
        name="pawsx",
        default_languages=("en", "fr", "de", "ko", "es"),
        known_languages=("en", "de", "es", "fr", "ja", "ko", "zh"),
        text_fields=("sentence1", "sentence2"),
        label_field="label",
        map_label=_pawsx_label,
        parallel=True,
        hub_root="hf://datasets/google-research-datasets/paws-x",
        id_field="id",
        bundled=True,
    ),
    "xnli": TaskSpec(
        name="xnli",
        default_languages=("en", "fr", "de", "ru", "es"),
        known_languages=("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"),
        text_fields=("premise", "hypothesis"),
        label_field="label",
        map_label=_xnli_label,
        parallel=True,
        hub_root="hf://datasets/facebook/xnli",
        id_field=None,
        bundled=True,
    ),
    "marc": TaskSpec(
        name="marc",
        default_languages=("zh", "en", "fr", "de", "es"),
        known_languages=("de", "en", "es", "fr", "ja", "zh"),
        text_fields=("review_body",),
        label_field="stars",
        map_label=_marc_label,
        parallel=False,
        hub_root=None,  # withdrawn from the hub in 2023: the user names a copy with data.hub_id
        id_field="review_id",
        bundled=False,
    ),
}

SPLITS = ("train", "dev", "test")
