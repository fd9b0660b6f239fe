"""The ``influence/<condition>/topk.npz`` file: the top-m training examples per test example, and its reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..contributions import (
    SIGNS,
    language_codes,
    language_shares,
    train_language_lookup,
)
from .options import InfluenceError, MissingInputs

TOPK_FORMAT = 1


@dataclass
class TopKFile:
    """The content of ``influence/<condition>/topk.npz`` (contract arrays plus the metadata the report needs).

    Attributes:
        meta: condition, languages, epochs, options, masks, projection, inputs_key.
        arrays: name → array (test_indices, test_langs, pos_idx, pos_score, neg_idx, neg_score, epochs,
            pos_idx_by_epoch, ..., test_correct, test_correct_by_epoch, train_indices, train_langs, ...).
    """

    meta: dict
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def languages(self) -> list[str]:
        return list(self.meta["languages"])

    @property
    def epochs(self) -> list[int]:
        return [int(e) for e in self.arrays["epochs"]]

    def test_codes(self) -> np.ndarray:
        return language_codes(self.arrays["test_langs"], self.languages, "test languages")

    def lookup(self) -> np.ndarray:
        return train_language_lookup(self.arrays["train_indices"], self.arrays["train_langs"], self.languages)

    def top_idx(self, sign: str, epoch_pos: int | None = None) -> np.ndarray:
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, found {sign!r}")
        if epoch_pos is None:
            return self.arrays[f"{sign}_idx"]
        return self.arrays[f"{sign}_idx_by_epoch"][epoch_pos]

    def shares(self, sign: str, rows: np.ndarray | None = None, epoch_pos: int | None = None) -> np.ndarray:
        """(n, L) % of each training language in the top-m of each selected test row."""
        idx = self.top_idx(sign, epoch_pos)
        if rows is not None:
            idx = idx[rows]
        return language_shares(idx, self.lookup(), len(self.languages))


def save_topk(path: Path, top: TopKFile) -> Path:
    """Write a topk.npz atomically (plain arrays only: readable with allow_pickle=False)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(top.meta)), **top.arrays)
    return path


def load_topk(path: str | Path) -> TopKFile:
    """Read a topk.npz written by ``save_topk``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputs("topk", [path])
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as err:
        raise InfluenceError(f"{path}: not a readable .npz file ({err})") from None
    required = (
        "meta",
        "test_indices",
        "test_langs",
        "pos_idx",
        "pos_score",
        "neg_idx",
        "neg_score",
        "epochs",
        "train_indices",
        "train_langs",
        "test_correct",
    )
    for key in required:
        if key not in arrays:
            raise InfluenceError(f"{path}: missing array {key!r} (expected a crossling topk.npz)")
    meta = json.loads(str(arrays.pop("meta")))
    return TopKFile(meta, arrays)


def influence_dir_name(method: str = "tracin") -> str:
    """The run's folder of a method's rankings: ``influence`` for TracIn (the paper's), else ``influence-<method>``."""
    return "influence" if method == "tracin" else f"influence-{method}"


def topk_path(run_dir: Path, condition: str, method: str = "tracin") -> Path:
    return Path(run_dir) / influence_dir_name(method) / condition / "topk.npz"

