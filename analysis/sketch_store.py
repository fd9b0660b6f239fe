"""Reading gradient sketches: ``sketches/epoch=<E>/<mask>/<split>.npy`` (N×d float32) and the
``.json`` sidecar beside it (see docs/methods.md, "Influence (TracIn)"). numpy only.

Influence is only meaningful between sketches taken with the same projection of the same
layers, so every reader goes through ``check_compatible``, which names the file that differs
and the key it differs in, instead of silently scoring mismatched vectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
SPLITS = ("train", "test")
REQUIRED_KEYS = {
    "format": int,
    "split": str,
    "mask": str,
    "epoch": int,
    "n": int,
    "d": int,
    "dtype": str,
    "projection": dict,
    "layers": list,
    "model_fingerprint": str,
    "indices": list,
    "ids": list,
    "langs": list,
    "labels": list,
    "loss": list,
    "pred": list,
    "correct": list,
    "languages": list,
}
ROW_KEYS = ("indices", "ids", "langs", "labels", "loss", "pred", "correct")
# keys that must agree for two sketch files to be scored against each other
PROJECTION_KEYS = ("format", "d", "dtype", "projection", "layers", "languages")
_EPOCH_DIR = re.compile(r"^epoch=(\d+)$")


class SketchError(ValueError):
    """A sketch file that is missing, malformed, or does not fit the sketches it is used with."""


def sketch_dir(run_dir: str | Path, epoch: int, mask: str) -> Path:
    return Path(run_dir) / "sketches" / f"epoch={epoch}" / mask


def sketch_paths(run_dir: str | Path, epoch: int, mask: str, split: str) -> tuple[Path, Path]:
    """(``<split>.npy``, ``<split>.json``) of one sketch file."""
    if split not in SPLITS:
        raise SketchError(f"sketch split must be one of {SPLITS}, found {split!r}")
    directory = sketch_dir(run_dir, epoch, mask)
    return directory / f"{split}.npy", directory / f"{split}.json"


def validate_sidecar(data: object, path: Path) -> dict:
    """Check a sidecar's keys, types and row counts; returns it."""
    if not isinstance(data, dict):
        raise SketchError(f"{path}: expected a JSON object, found {type(data).__name__}")
    for key, kind in REQUIRED_KEYS.items():
        if key not in data:
            raise SketchError(f"{path}: missing key {key!r} (a sketch sidecar needs {sorted(REQUIRED_KEYS)})")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise SketchError(
                f"{path}: key {key!r} must be {kind.__name__}, found {type(data[key]).__name__}"
            )
    if data["format"] != FORMAT:
        raise SketchError(f"{path}: sketch format {data['format']}, this crossling reads format {FORMAT}")
    if data["dtype"] != "float32":
        raise SketchError(f"{path}: key 'dtype' must be 'float32', found {data['dtype']!r}")
    for key in ROW_KEYS:
        if len(data[key]) != data["n"]:
            raise SketchError(f"{path}: key {key!r} has {len(data[key])} entries, expected n = {data['n']}")
    indices = np.asarray(data["indices"], dtype=np.int64)
    if indices.size > 1 and not (np.diff(indices) > 0).all():
        raise SketchError(f"{path}: key 'indices' must be strictly ascending dataset indices")
    return data


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SketchError(f"sketch sidecar not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SketchError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    return validate_sidecar(data, path)


def load_sketches(run_dir: str | Path, epoch: int, mask: str, split: str) -> tuple[np.ndarray, dict]:
    """(memory-mapped N×d float32 array, sidecar dict) of one finished sketch file."""
    npy, side = sketch_paths(run_dir, epoch, mask, split)
    if not npy.is_file():
        partial = npy.with_name(npy.name + ".partial")
        hint = (
            " (a .partial file exists: the sketch stage has not finished it; run it again to resume)"
            if (partial.exists())
            else " (run the sketch stage)"
        )
        raise SketchError(f"sketches not found: {npy}{hint}")
    sidecar = read_sidecar(side)
    try:
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise SketchError(f"{npy}: not a readable .npy file ({err})") from None
    expected = (sidecar["n"], sidecar["d"])
    if array.dtype != np.float32 or array.shape != expected:
        raise SketchError(
            f"{npy}: holds {array.dtype} {array.shape}, its sidecar {side.name} says float32 {expected}"
        )
    for key, value in (("epoch", epoch), ("mask", mask), ("split", split)):
        if sidecar[key] != value:
            raise SketchError(
                f"{side}: key {key!r} is {sidecar[key]!r}, but the file lies where {value!r} belongs"
            )
    return array, sidecar


@dataclass
class Sketch:
    """One finished sketch file pair: the (N, d) float32 memory map and its validated sidecar."""

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


def read_sketch(run_dir: str | Path, epoch: int, mask: str, split: str) -> Sketch:
    """``load_sketches`` with the paths kept beside the data, for readers that name files in errors."""
    data, meta = load_sketches(run_dir, epoch, mask, split)
    npy, sidecar = sketch_paths(run_dir, epoch, mask, split)
    return Sketch(npy, sidecar, meta, data)


def check_compatible(entries: Sequence[tuple[str | Path, dict]], same_model: bool = False) -> None:
    """Refuse to score sketches against each other unless they share d, projection and layers.

    Args:
        entries: (path, sidecar) pairs; the first is the reference the others are compared with.
        same_model: also require the same checkpoint (model fingerprint and epoch): train and test
            sketches of one epoch.
    """
    if not entries:
        return
    ref_path, ref = entries[0]
    keys = PROJECTION_KEYS + (("model_fingerprint", "epoch") if same_model else ())
    for path, other in entries[1:]:
        for key in keys:
            if other.get(key) != ref.get(key):
                raise SketchError(
                    f"{path}: {key} is {_short(other.get(key))} there but {_short(ref.get(key))} in {ref_path}; "
                    "sketches must come from the same projection, layers and model to be compared (delete the "
                    "stale sketches and run the sketch stage again)"
                )


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def list_epochs(run_dir: str | Path) -> list[int]:
    """Epochs with a ``sketches/epoch=<E>`` directory, ascending."""
    root = Path(run_dir) / "sketches"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _EPOCH_DIR.match(p.name)))


def run_languages(run_dir: str | Path, epochs: Sequence[int]) -> list[str] | None:
    """The run's language order, from the first sketch sidecar of these epochs; None when there is none."""
    for epoch in epochs:
        for side in sorted((Path(run_dir) / "sketches" / f"epoch={epoch}").glob("*/*.json")):
            langs = read_sidecar(side)["languages"]
            if not langs or not all(isinstance(x, str) for x in langs):
                raise SketchError(f"{side}: key 'languages' must be a non-empty list of language codes")
            return langs
    return None


def list_sketches(run_dir: str | Path) -> list[tuple[int, str, str]]:
    """Finished sketch files of a run as (epoch, mask, split), sorted."""
    root = Path(run_dir) / "sketches"
    found = []
    if not root.is_dir():
        return found
    for epoch_dir in root.iterdir():
        if not (m := _EPOCH_DIR.match(epoch_dir.name)) or not epoch_dir.is_dir():
            continue
        for mask_dir in epoch_dir.iterdir():
            for split in SPLITS:
                if (mask_dir / f"{split}.npy").is_file() and (mask_dir / f"{split}.json").is_file():
                    found.append((int(m.group(1)), mask_dir.name, split))
    return sorted(found)
