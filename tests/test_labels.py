"""Label mapping: every source must give the paper's binary labels.

XNLI: entailment (1) vs not (0), from the 3-way strings and from the hub's ints
(0 entailment, 1 neutral, 2 contradiction). PAWS-X: 0/1 as is. MARC: stars 1-2 -> 0,
4-5 -> 1, 3 dropped. Anything else is a DataError naming the file and line.
"""

from __future__ import annotations

import json
import random

import pytest

from datamodules import DataError
from datamodules.sources import read_local
from datamodules.tasks import TASKS

# The specification (the paper's binarisation and the hub's XNLI label order), written out
# independently of datamodules/tasks.py.
XNLI_STRINGS = {"entailment": 1, "neutral": 0, "contradiction": 0}
XNLI_HUB_INTS = {0: 1, 1: 0, 2: 0}
MARC_STARS = {1: 0, 2: 0, 3: None, 4: 1, 5: 1}


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_xnli_maps_three_way_strings_and_hub_ints_to_entailment_vs_not():
    xnli = TASKS["xnli"].map_label
    for text, expected in XNLI_STRINGS.items():
        assert xnli(text) == expected
        assert xnli(text.upper()) == expected
        assert xnli(f" {text} ") == expected
    for value, expected in XNLI_HUB_INTS.items():
        assert xnli(value) == expected


def test_pawsx_labels_are_zero_or_one():
    pawsx = TASKS["pawsx"].map_label
    assert pawsx(0) == 0 and pawsx(1) == 1
    assert pawsx("0") == 0 and pawsx("1") == 1


def test_marc_stars_binarised_and_three_dropped():
    marc = TASKS["marc"].map_label
    for stars, expected in MARC_STARS.items():
        assert marc(stars) == expected
        assert marc(str(stars)) == expected


@pytest.mark.parametrize(
    "task, bad",
    [
        ("xnli", 3),
        ("xnli", -1),
        ("xnli", "entails"),
        ("xnli", True),
        ("xnli", 1.0),
        ("xnli", None),
        ("pawsx", 2),
        ("pawsx", -1),
        ("pawsx", "yes"),
        ("pawsx", True),
        ("pawsx", 0.5),
        ("pawsx", None),
        ("marc", 0),
        ("marc", 6),
        ("marc", "five"),
        ("marc", 4.5),
        ("marc", False),
        ("marc", None),
    ],
)
def test_label_outside_task_set_is_rejected(task, bad):
    with pytest.raises(ValueError, match="expected"):
        TASKS[task].map_label(bad)


def test_local_files_give_mapped_labels_for_every_row(tmp_path):
    """Random rows through the real reader: each record's label is the specification's mapping."""
    rng = random.Random(11)
    xnli_rows = [
        {
            "id": f"x{i}",
            "premise": f"p {i}",
            "hypothesis": f"h {i}",
            "label": rng.choice([*XNLI_STRINGS, *XNLI_HUB_INTS]),
        }
        for i in range(40)
    ]
    write_jsonl(tmp_path / "xnli" / "train" / "en.jsonl", xnli_rows)
    records = read_local("xnli", "train", "en", tmp_path)
    expected = [
        XNLI_STRINGS.get(r["label"]) if isinstance(r["label"], str) else XNLI_HUB_INTS[r["label"]]
        for r in xnli_rows
    ]
    assert [r.label for r in records] == expected
    assert [r.texts for r in records] == [(r["premise"], r["hypothesis"]) for r in xnli_rows]

    marc_rows = [
        {"review_id": f"en_{i}", "stars": rng.randint(1, 5), "review_body": f"body {i}"} for i in range(40)
    ]
    write_jsonl(tmp_path / "marc" / "train" / "en.jsonl", marc_rows)
    records = read_local("marc", "train", "en", tmp_path)
    kept = [r for r in marc_rows if r["stars"] != 3]
    assert [r.id for r in records] == [r["review_id"] for r in kept]
    assert [r.label for r in records] == [MARC_STARS[r["stars"]] for r in kept]


@pytest.mark.parametrize(
    "task, fields, bad",
    [
        ("xnli", {"premise": "a", "hypothesis": "b"}, "maybe"),
        ("xnli", {"premise": "a", "hypothesis": "b"}, 7),
        ("pawsx", {"id": 1, "sentence1": "a", "sentence2": "b"}, 2),
        ("marc", {"review_id": "r", "review_body": "a"}, 0),
    ],
)
def test_bad_label_in_file_names_file_line_key_and_value(tmp_path, task, fields, bad):
    label_key = TASKS[task].label_field
    valid = {"xnli": "neutral", "pawsx": 1, "marc": 5}[task]  # two good lines before the bad one
    rows = [{**fields, label_key: valid}, {**fields, label_key: valid}, {**fields, label_key: bad}]
    path = tmp_path / task / "dev" / "fr.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(DataError) as err:
        read_local(task, "dev", "fr", tmp_path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert repr(label_key) in message
    assert repr(bad) in message and "expected" in message
