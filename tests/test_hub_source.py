"""The ``hub`` source through its real code path (``datasets.load_dataset("parquet", ...)``) on a
local folder in the hub's parquet layout, and MARC from the user's own files (Amazon's
``dataset_<lang>_<split>.json`` and ``<task>/<split>/<lang>.jsonl``). All data is written here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules import MARCDataModule, PAWSXDataModule, XNLIDataModule

HUB_FILE = {"train": "train", "dev": "validation", "test": "test"}
XNLI_HUB_INTS = {0: 1, 1: 0, 2: 0}  # hub: 0 entailment, 1 neutral, 2 contradiction -> entailment vs not
MARC_STARS = {1: 0, 2: 0, 4: 1, 5: 1}


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep ``datasets``' cache inside the test's folder and stay offline."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_parquet(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def hub_layout(root: Path, langs, make_columns) -> dict:
    """``<root>/<lang>/<split>-00000-of-00001.parquet``; returns what was written per (lang, split)."""
    written = {}
    for lang in langs:
        for split, name in HUB_FILE.items():
            columns = make_columns(lang, split)
            write_parquet(root / lang / f"{name}-00000-of-00001.parquet", columns)
            written[(lang, split)] = columns
    return written


def test_pawsx_from_hub_layout(tmp_path):
    rng = random.Random(1)
    sizes = {"train": 14, "dev": 6, "test": 5}

    def columns(lang, split):
        n = sizes[split]
        ids = list(range(100, 100 + n))
        return {
            "id": ids,
            "sentence1": [f"{lang} {split} first {i} {rng.random():.4f}" for i in ids],
            "sentence2": [f"{lang} {split} second {i}" for i in ids],
            "label": [rng.randint(0, 1) for _ in ids],
        }

    root = tmp_path / "paws-x"
    written = hub_layout(root, ["en", "ko"], columns)
    dm = PAWSXDataModule(
        languages=["en", "ko"],
        source="hub",
        hub_id=str(root),
        train_per_language=None,
        dev_per_language=None,
        test_per_language=None,
        backbone="tiny-random",
    )
    for split in ("train", "dev", "test"):
        records = dm.load_records(split)
        assert len(records) == 2 * sizes[split]
        for lang in ("en", "ko"):
            mine = [r for r in records if r.lang == lang]
            cols = written[(lang, split)]
            assert [r.id for r in mine] == [str(i) for i in cols["id"]]
            assert [r.texts for r in mine] == list(zip(cols["sentence1"], cols["sentence2"]))
            assert [r.label for r in mine] == cols["label"]
    # sampling through the same path stays parallel
    dm_small = PAWSXDataModule(
        languages=["en", "ko"], source="hub", hub_id=str(root), train_per_language=5, backbone="tiny-random"
    )
    records = dm_small.load_records("train")
    assert sorted(r.id for r in records if r.lang == "en") == sorted(r.id for r in records if r.lang == "ko")


def test_xnli_from_hub_layout_binarises_int_labels(tmp_path):
    rng = random.Random(2)

    def columns(lang, split):
        n = 9 if split == "train" else 4
        return {
            "premise": [f"{lang} premise {split} {i}" for i in range(n)],
            "hypothesis": [f"{lang} hypothesis {split} {i}" for i in range(n)],
            "label": [rng.randint(0, 2) for _ in range(n)],
        }

    root = tmp_path / "xnli"
    written = hub_layout(root, ["de", "ru"], columns)
    dm = XNLIDataModule(
        languages=["de", "ru"],
        source="hub",
        hub_id=str(root),
        train_per_language=None,
        dev_per_language=None,
        test_per_language=None,
        backbone="tiny-random",
    )
    dataset = dm.dataset("train")  # through tokenisation too
    records = [e.record for e in dataset.examples]
    for lang in ("de", "ru"):
        cols = written[(lang, "train")]
        mine = [r for r in records if r.lang == lang]
        assert [r.texts for r in mine] == list(zip(cols["premise"], cols["hypothesis"]))
        assert [r.label for r in mine] == [XNLI_HUB_INTS[v] for v in cols["label"]]
    # no id column: the row number is the item id, the same in every language
    assert [r.id for r in records if r.lang == "de"] == [r.id for r in records if r.lang == "ru"]
    assert len({r.id for r in records}) == 9


def marc_rows(lang: str, split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{lang}-{split}-{seed}")
    return [
        {
            "review_id": f"{lang}_{rng.randrange(10**7):07d}",
            "product_id": f"product_{lang}_{i}",
            "reviewer_id": f"reviewer_{lang}_{i}",
            "stars": rng.randint(1, 5),
            "review_body": f"{lang} {split} review {i}: {rng.random():.6f}",
            "review_title": f"title {i}",
            "language": lang,
            "product_category": "home",
        }
        for i in range(n)
    ]


def check_marc(records, rows_by_lang, id_of):
    for lang, rows in rows_by_lang.items():
        kept = [row for row in rows if row["stars"] != 3]
        mine = [r for r in records if r.lang == lang]
        assert [r.texts for r in mine] == [(row["review_body"],) for row in kept]
        assert [r.label for r in mine] == [MARC_STARS[row["stars"]] for row in kept]
        assert [r.id for r in mine] == [id_of(row, rows) for row in kept]


@pytest.mark.parametrize("where", ["root", "split_folder"])
def test_marc_from_amazon_files(tmp_path, where):
    rows_by_split = {}
    for split, amazon_split in (("train", "train"), ("dev", "dev"), ("test", "test")):
        rows_by_split[split] = {}
        for lang in ("zh", "fr"):
            rows = marc_rows(lang, split, 30, seed=0)
            folder = tmp_path if where == "root" else tmp_path / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"dataset_{lang}_{amazon_split}.json").write_text(
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
            )
            rows_by_split[split][lang] = rows
    dm = MARCDataModule(
        languages=["zh", "fr"],
        data_dir=str(tmp_path),
        train_per_language=None,
        dev_per_language=None,
        test_per_language=None,
        backbone="tiny-random",
    )
    assert dm.source == "local"
    for split, rows_by_lang in rows_by_split.items():
        # Amazon's files: the line number within the split is the stable id
        check_marc(
            dm.load_records(split), rows_by_lang, lambda row, rows, split=split: f"{split}:{rows.index(row)}"
        )


def test_marc_from_task_split_lang_jsonl(tmp_path):
    rows_by_lang = {}
    for lang in ("en", "de", "es"):
        rows = marc_rows(lang, "train", 25, seed=1)
        path = tmp_path / "marc" / "train" / f"{lang}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        rows_by_lang[lang] = rows
    dm = MARCDataModule(
        languages=["en", "de", "es"], data_dir=str(tmp_path), train_per_language=None, backbone="tiny-random"
    )
    check_marc(dm.load_records("train"), rows_by_lang, lambda row, rows: row["review_id"])


def test_marc_from_a_user_hub_copy(tmp_path):
    rows = {lang: marc_rows(lang, "train", 20, seed=2) for lang in ("ja", "en")}
    root = tmp_path / "marc-copy"
    for lang, lang_rows in rows.items():
        for name in HUB_FILE.values():
            write_parquet(
                root / lang / f"{name}-00000-of-00001.parquet",
                {k: [row[k] for row in lang_rows] for k in lang_rows[0]},
            )
    dm = MARCDataModule(
        languages=["ja", "en"],
        source="hub",
        hub_id=str(root),
        train_per_language=None,
        backbone="tiny-random",
    )
    check_marc(dm.load_records("train"), rows, lambda row, rows: row["review_id"])
