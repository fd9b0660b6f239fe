"""Reading task data from the three sources into one record type.

``bundled``: the gzip JSON lines shipped inside this package (PAWS-X, XNLI).
``local``: a directory laid out as ``<task>/<split>/<lang>.jsonl`` (optionally ``.gz``); for
MARC also Amazon's original ``dataset_<lang>_<split>.json`` files.
``hub``: the datasets' parquet exports (``<root>/<lang>/<split>-*.parquet``), read with
``datasets``; ``root`` is ``hf://datasets/<repo>`` on the hub, or a local folder with the same
layout (how the tests exercise this path).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .tasks import SPLITS, TASKS, TaskSpec

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
HUB_SPLIT = {"train": "train", "dev": "validation", "test": "test"}
AMAZON_SPLIT = {"train": "train", "dev": "dev", "test": "test"}


@dataclass(frozen=True)
class Record:
    """One labelled example. ``id`` is the item id shared across languages for parallel tasks."""

    id: str
    lang: str
    texts: tuple[str, ...]
    label: int


def _parse_row(spec: TaskSpec, row: dict, where: str, row_number: int, split: str) -> Record | None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    texts = []
    for field in spec.text_fields:
        if field not in row:
            raise DataError(f"{where}: missing key {field!r} (expected keys {list(spec.text_fields)})")
        if not isinstance(row[field], str):
            raise DataError(f"{where}: key {field!r} should be a string, found {row[field]!r}")
        texts.append(row[field])
    if spec.label_field not in row:
        raise DataError(f"{where}: missing label key {spec.label_field!r}")
    try:
        label = spec.map_label(row[spec.label_field])
    except ValueError as err:
        raise DataError(f"{where}: key {spec.label_field!r}: {err}") from None
    if label is None:
        return None
    if spec.id_field and row.get(spec.id_field) is not None:
        item_id = str(row[spec.id_field])
    elif "id" in row:
        item_id = str(row["id"])
    else:
        item_id = f"{split}:{row_number}"
    return Record(id=item_id, lang="", texts=tuple(texts), label=label)


def _read_jsonl(path: Path, spec: TaskSpec, lang: str, split: str) -> list[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})") from None
            record = _parse_row(spec, row, f"{path}:{number}", number - 1, split)
            if record is not None:
                records.append(Record(record.id, lang, record.texts, record.label))
    return records


def _read_amazon(path: Path, spec: TaskSpec, lang: str, split: str) -> list[Record]:
    """Amazon's MARC files: JSON lines whose line number is the review's stable id."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})") from None
            record = _parse_row(spec, {**row, "review_id": None, "id": None}, f"{path}:{number}", number - 1, split)
            if record is not None:
                records.append(Record(f"{split}:{number - 1}", lang, record.texts, record.label))
    return records


def read_bundled(task: str, split: str, lang: str) -> list[Record]:
    spec = TASKS[task]
    if not spec.bundled:
        raise DataError(
            f"task {task!r} has no bundled data: its licence forbids redistribution. "
            f"Use --data.source local --data.data_dir DIR (your own copy) or --data.source hub --data.hub_id REPO."
        )
    path = BUNDLED_DIR / task / split / f"{lang}.jsonl.gz"
    if not path.is_file():
        raise DataError(f"bundled file missing: {path} (reinstall crossling?)")
    return _read_jsonl(path, spec, lang, split)


def read_local(task: str, split: str, lang: str, data_dir: str | Path | None) -> list[Record]:
    if data_dir is None:
        raise DataError("--data.source local needs --data.data_dir DIR (expected layout <task>/<split>/<lang>.jsonl)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (expected a folder with <task>/<split>/<lang>.jsonl)")
    spec = TASKS[task]
    candidates = [root / task / split / f"{lang}.jsonl", root / task / split / f"{lang}.jsonl.gz"]
    if task == "marc":
        # Amazon's release: dataset_<lang>_<split>.json, in data_dir or data_dir/<split>.
        name = f"dataset_{lang}_{AMAZON_SPLIT[split]}.json"
        for amazon in (root / name, root / split / name, root / "marc" / name):
            if amazon.is_file():
                return _read_amazon(amazon, spec, lang, split)
        candidates.append(root / name)
    for path in candidates:
        if path.is_file():
            return _read_jsonl(path, spec, lang, split)
    raise DataError(f"data file not found: expected {candidates[0]}" + (
        f" or {candidates[-1]}" if task == "marc" else "") + f" (task {task}, split {split}, language {lang})")


def read_hub(task: str, split: str, lang: str, hub_id: str | None) -> list[Record]:
    """Read ``<root>/<lang>/<split>-*.parquet`` through ``datasets`` (hub or local mirror)."""
    spec = TASKS[task]
    if hub_id:
        root = hub_id if ("://" in hub_id or Path(hub_id).expanduser().is_dir()) else f"hf://datasets/{hub_id}"
    elif spec.hub_root:
        root = spec.hub_root
    else:
        raise DataError(
            f"task {task!r} is no longer on the HuggingFace hub (amazon_reviews_multi was withdrawn in 2023): "
            "give --data.hub_id <user>/<repo> of a parquet copy, or use --data.source local with Amazon's files"
        )
    root = str(Path(root).expanduser()) if "://" not in root else root
    pattern = f"{root.rstrip('/')}/{lang}/{HUB_SPLIT[split]}-*.parquet"
    if "://" not in root and not list(Path(root, lang).glob(f"{HUB_SPLIT[split]}-*.parquet")):
        raise DataError(f"no parquet files match {pattern} (expected <root>/<lang>/<split>-*.parquet)")
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files={"rows": pattern}, split="rows")
    except FileNotFoundError as err:
        raise DataError(f"no parquet files match {pattern} ({err})") from None
    except ValueError as err:
        if "data_files" not in str(err):  # datasets' "all the data_files are invalid": nothing matched
            raise
        raise DataError(f"no parquet files match {pattern} (expected <root>/<lang>/<split>-*.parquet)") from None
    records = []
    for number, row in enumerate(table):
        record = _parse_row(spec, row, f"{pattern} row {number}", number, split)
        if record is not None:
            records.append(Record(record.id, lang, record.texts, record.label))
    return records


def read_split(task: str, split: str, lang: str, source: str, data_dir=None, hub_id=None) -> list[Record]:
    """All records of one task/split/language from the named source, labels already mapped."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {SPLITS}")
    if source == "bundled":
        return read_bundled(task, split, lang)
    if source == "local":
        return read_local(task, split, lang, data_dir)
    if source == "hub":
        return read_hub(task, split, lang, hub_id)
    raise DataError(f"unknown data source {source!r}: expected bundled, hub or local")


def describe_source(task: str, split: str, lang: str, source: str, data_dir=None, hub_id=None) -> str:
    """Where ``read_split`` looks for one task/split/language, for error messages."""
    if source == "bundled":
        return str(BUNDLED_DIR / task / split / f"{lang}.jsonl.gz")
    if source == "local":
        return str(Path(data_dir or ".") / task / split / f"{lang}.jsonl")
    root = hub_id or TASKS[task].hub_root or "<hub_id>"
    return f"{root}/{lang}/{HUB_SPLIT[split]}-*.parquet"


def iter_bundled_texts(split: str = "train") -> Iterator[str]:
    """Every text field of every bundled task and language in one split (the tiny tokenizer's corpus, the vocabulary cut)."""
    for task, spec in TASKS.items():
        if not spec.bundled:
            continue
        for lang in spec.default_languages:
            for record in read_bundled(task, split, lang):
                yield from record.texts
