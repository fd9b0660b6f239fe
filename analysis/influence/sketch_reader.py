"""Reading a run's sketch files for ranking: memory-mapped, checked against the file contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import InfluenceError, MissingInputs

_EPOCH_DIR = re.compile(r"^epoch=(\d+)$")


_SIDECAR_LISTS = ("indices", "ids", "langs", "labels", "correct")


@dataclass
class Sketch:
    """One sketch file pair: the (N, d) float32 memory map and its validated sidecar."""

    npy: Path
    sidecar: Path
    meta: dict
    data: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return np.asarray(self.meta["indices"], dtype=np.int64)

    @property
    def langs(self) -> np.ndarray:
        return np.asarray(self.meta["langs"], dtype=str)


def sketch_paths(run_dir: Path, epoch: int, mask: str, split: str) -> tuple[Path, Path]:
    base = Path(run_dir) / "sketches" / f"epoch={epoch}" / mask
    return base / f"{split}.npy", base / f"{split}.json"


def read_sketch(run_dir: Path, epoch: int, mask: str, split: str) -> Sketch:
    """Open one sketch (memory-mapped) and check it against the contract; errors name file and key."""
    npy, sidecar = sketch_paths(run_dir, epoch, mask, split)
    for path in (npy, sidecar):
        if not path.is_file():
            raise MissingInputs(f"{mask}/{split}", [path])
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InfluenceError(f"{sidecar}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise InfluenceError(f"{sidecar}: expected a JSON object, found {type(meta).__name__}")
    for key in ("n", "d", *_SIDECAR_LISTS):
        if key not in meta:
            raise InfluenceError(f"{sidecar}: missing key {key!r}")
    n, d = meta["n"], meta["d"]
    if not isinstance(n, int) or not isinstance(d, int) or n < 0 or d < 1:
        raise InfluenceError(
            f"{sidecar}: keys 'n' and 'd' must be non-negative integers, found n={n!r}, d={d!r}"
        )
    for key in _SIDECAR_LISTS:
        if not isinstance(meta[key], list) or len(meta[key]) != n:
            found = len(meta[key]) if isinstance(meta[key], list) else type(meta[key]).__name__
            raise InfluenceError(f"{sidecar}: key {key!r} must be a list of n={n} values, found {found}")
    for key, expected in (("split", split), ("mask", mask), ("epoch", epoch)):
        if key in meta and meta[key] != expected:
            raise InfluenceError(
                f"{sidecar}: key {key!r} is {meta[key]!r}, expected {expected!r} (from its path)"
            )
    if meta.get("dtype", "float32") != "float32":
        raise InfluenceError(f"{sidecar}: key 'dtype' must be 'float32', found {meta['dtype']!r}")
    indices = np.asarray(meta["indices"])
    if n and (indices.dtype.kind not in "iu" or np.any(np.diff(indices) <= 0)):
        raise InfluenceError(f"{sidecar}: key 'indices' must be strictly ascending integers")
    try:
        data = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InfluenceError(f"{npy}: not a readable .npy array ({err})") from None
    if data.shape != (n, d) or data.dtype != np.float32:
        raise InfluenceError(
            f"{npy}: expected float32 array of shape ({n}, {d}) (from {sidecar.name}), found {data.dtype} {data.shape}"
        )
    return Sketch(npy, sidecar, meta, data)


def list_epochs(run_dir: Path) -> list[int]:
    """Epochs with a ``sketches/epoch=<E>`` directory, ascending."""
    root = Path(run_dir) / "sketches"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _EPOCH_DIR.match(p.name)))


def run_languages(run_dir: Path, epochs: list[int]) -> list[str]:
    """The run's language order, from the first sketch sidecar found."""
    for epoch in epochs:
        for sidecar in sorted((Path(run_dir) / "sketches" / f"epoch={epoch}").glob("*/*.json")):
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise InfluenceError(f"{sidecar}: not valid JSON ({err.msg}, line {err.lineno})") from None
            langs = meta.get("languages") if isinstance(meta, dict) else None
            if not isinstance(langs, list) or not langs or not all(isinstance(x, str) for x in langs):
                raise InfluenceError(f"{sidecar}: key 'languages' must be a non-empty list of language codes")
            return langs
    raise MissingInputs("*", [Path(run_dir) / "sketches" / "epoch=<E>" / "<mask>" / "<split>.json"])


class RowView:
    """Rows of a (memory-mapped) array, selected lazily so a test chunk is read only when ranked."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (rows.size, base.shape[1])
        self.ndim = 2

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.base[self.rows[item]])

