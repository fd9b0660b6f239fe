"""A planted effect with a known answer: a word that reveals the label, put into a chosen share of one
language's training and test items, and nothing else changed.

Why: the study's measures of cross-language influence (retraining without a language, TracIn's
prediction of it, TracIn's language shares) report effects of unknown size on natural data; a null from
them says nothing until each is shown to find an effect that is there. A marker only one language's
training items carry is such an effect: the model learns the shortcut from them, so leaving that language
out must raise its marked test items' loss, and the marked training items must be what a marked test item
relies on. Sweeping the share of marked items gives the weakest effect each measure still finds.

Items are chosen with a generator seeded from a name, the split, the language and the data seed (never
the global RNG), so that a fit, its leave-out fits and their analyses plant the same items.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from .errors import DataError
from .sources import Record

PLANTED_SPLITS = ("train", "test")  # dev stays natural: it judges what the model learned, not the shortcut


@dataclass(frozen=True)
class PlantOptions:
    """Where the marker goes.

    Args:
        language: the language whose items carry the marker (one of the run's languages).
        fraction: the share of that language's training items, and of its test items, that carry it, in (0, 1].
        markers: one word per label (``markers[label]``), put before the item's last text (an NLI
            hypothesis, the second sentence of a PAWS-X pair, a review); each must be in the model's
            vocabulary (with ``model.vocabulary: bundled``, a word the bundled data use).
    """

    language: str
    fraction: float = 0.25
    markers: tuple[str, ...] = ("nein", "ja")


def plant_options(plant: PlantOptions | dict) -> PlantOptions:
    """``plant`` as options: a mapping is how a run's ``config.yaml`` holds them (the CLI builds the
    dataclass itself; code that replays a run from its file passes the mapping)."""
    if isinstance(plant, PlantOptions):
        return plant
    known = {"language", "fraction", "markers"}
    if not isinstance(plant, dict) or set(plant) - known or "language" not in plant:
        raise DataError(f"data.init_args.plant: expected a mapping with 'language' and optionally 'fraction' and "
                        f"'markers', found {plant!r}")
    return PlantOptions(**{k: tuple(v) if k == "markers" and isinstance(v, list) else v for k, v in plant.items()})


def check_plant(plant: PlantOptions, languages: list[str], n_labels: int = 2) -> None:
    """Bad options are one line naming the key, before any data is read."""
    key = "data.init_args.plant"
    if plant.language not in languages:
        raise DataError(f"{key}.language: {plant.language!r} is not a language of this run; expected one of {languages}")
    fraction = plant.fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise DataError(f"{key}.fraction: expected a share of items in (0, 1], found {fraction!r}")
    markers = list(plant.markers)
    if len(markers) != n_labels or not all(isinstance(m, str) and m.strip() and m == m.strip() for m in markers) \
            or len(set(markers)) != len(markers):
        raise DataError(f"{key}.markers: expected {n_labels} distinct non-empty words, one per label "
                        f"(markers[label]), found {markers!r}")


def planted_positions(records: list[Record], split: str, plant: PlantOptions, seed: int) -> np.ndarray:
    """Positions in ``records`` (a split's records in index order) that carry the marker, sorted: a
    ``fraction`` of the planted language's records (at least one), drawn with a generator seeded from the
    name, split, language and data seed. Empty for a split that is not planted."""
    if split not in PLANTED_SPLITS:
        return np.zeros(0, dtype=np.int64)
    own = np.array([i for i, r in enumerate(records) if r.lang == plant.language], dtype=np.int64)
    if own.size == 0:
        return own
    count = min(own.size, max(1, round(plant.fraction * own.size)))
    rng = np.random.default_rng([zlib.crc32(f"crossling:plant:{split}:{plant.language}".encode()), seed])
    return np.sort(rng.choice(own, size=count, replace=False))


def plant_records(records: list[Record], positions: np.ndarray, plant: PlantOptions) -> list[Record]:
    """``records`` with ``markers[label]`` put before the last text of the records at ``positions``."""
    planted = list(records)
    for i in positions.tolist():
        record = planted[i]
        texts = (*record.texts[:-1], f"{plant.markers[record.label]} {record.texts[-1]}")
        planted[i] = replace(record, texts=texts)
    return planted


def check_markers_tokenize(tokenizer, plant: PlantOptions) -> list[int]:
    """The token ids of the markers; a marker the tokenizer knows only as unknown is refused."""
    ids: list[int] = []
    unknown = tokenizer.unk_token_id
    for marker in plant.markers:
        pieces = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not pieces or (unknown is not None and unknown in pieces):
            raise DataError(f"data.init_args.plant.markers: {marker!r} is not in the tokenizer's vocabulary "
                            f"(it tokenizes to {pieces}); choose words the model knows")
        ids += pieces
    return sorted(set(ids))
