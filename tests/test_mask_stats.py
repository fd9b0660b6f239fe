"""Subnetwork statistics on hand-made masks, against values worked out by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from analysis.mask_stats import (
    disabled_heads,
    head_usage,
    mask_cosine,
    mask_cosine_per_layer,
    overlap_absolute,
    overlap_percent,
    usage_per_layer,
    write_mask_statistics,
)
from analysis.masks import MaskError, name_seed

LANGS = ["en", "de", "ko"]
# 2 layers x 3 heads; 1 = enabled
MASKS = {
    "en": np.array([[1, 1, 0], [1, 0, 1]]),
    "de": np.array([[1, 0, 0], [1, 1, 1]]),
    "ko": np.array([[0, 0, 0], [1, 0, 0]]),
}
NAN = float("nan")


def test_table1_disabled_heads():
    rows = disabled_heads(MASKS, LANGS)
    assert [(r["language"], r["disabled_heads"], r["total_heads"]) for r in rows] == [
        ("en", 2, 6),
        ("de", 2, 6),
        ("ko", 5, 6),
    ]
    assert [r["percent_disabled"] for r in rows] == pytest.approx([100 / 3, 100 / 3, 500 / 6])


def test_head_usage_and_per_layer_counts():
    assert head_usage(MASKS, LANGS).tolist() == [[2, 1, 0], [3, 1, 2]]
    # layer 0: one head each used by 0, 1, 2 languages; layer 1: by 1, 2, 3
    assert usage_per_layer(MASKS, LANGS).tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]


def test_overlap_absolute_and_percent():
    assert overlap_absolute(MASKS, LANGS).tolist() == [[4, 3, 1], [3, 4, 1], [1, 1, 1]]
    # row language is the denominator: ko's only head is shared with everyone
    expected = [[100, 75, 25], [75, 100, 25], [100, 100, 100]]
    np.testing.assert_allclose(overlap_percent(MASKS, LANGS), expected)
    empty = {"en": MASKS["en"], "xx": np.zeros((2, 3), dtype=int)}
    out = overlap_percent(empty, ["en", "xx"])
    assert out[0].tolist() == [100, 0] and np.isnan(out[1]).all()


def test_cosine_whole_and_per_layer():
    expected = [[1, 0.75, 0.5], [0.75, 1, 0.5], [0.5, 0.5, 1]]
    np.testing.assert_allclose(mask_cosine(MASKS, LANGS), expected)
    per_layer = mask_cosine_per_layer(MASKS, LANGS)
    s2, s3, s6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    layer0 = [[1, 1 / s2, NAN], [1 / s2, 1, NAN], [NAN, NAN, NAN]]  # ko has no head in layer 0
    layer1 = [[1, 2 / s6, 1 / s2], [2 / s6, 1, 1 / s3], [1 / s2, 1 / s3, 1]]
    np.testing.assert_allclose(per_layer, [layer0, layer1], equal_nan=True)


def test_order_follows_languages():
    order = ["ko", "en", "de"]
    assert overlap_absolute(MASKS, order).tolist() == [[1, 1, 1], [1, 4, 3], [1, 3, 4]]


def write_masks(directory, masks):
    directory.mkdir(parents=True, exist_ok=True)
    for lang, mask in masks.items():
        (directory / f"{lang}.json").write_text(json.dumps({"language": lang, "mask": mask.tolist()}))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_write_mask_statistics(tmp_path):
    sub = tmp_path / "subnetworks"
    write_masks(sub, MASKS)
    files = write_mask_statistics(sub, LANGS)
    stats = sub / "stats"
    for name in (
        "table1_disabled_heads.csv", "heads_usage_per_layer.csv", "overlap_absolute.csv", "overlap_percent.csv",
        "mask_cosine.csv", "mask_cosine_per_layer.csv", "heads_usage.png", "overlap_absolute.png",
        "overlap_percent.png", "mask_cosine.png", "mask_cosine_per_layer.png",
    ):  # fmt: skip
        assert (stats / name).is_file(), name
    for path in files.values():
        assert path.parent == stats
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(stats.glob("*.tmp*"))

    table = read_csv(stats / "table1_disabled_heads.csv")
    assert table[0] == ["language", "disabled_heads", "total_heads", "percent_disabled", "majority_rate", "degenerate"]
    assert all(row[4:] == ["", ""] for row in table[1:])  # masks without the search's outcome: empty cells
    assert [row[:3] for row in table[1:]] == [["en", "2", "6"], ["de", "2", "6"], ["ko", "5", "6"]]
    assert float(table[3][3]) == pytest.approx(500 / 6)
    usage = read_csv(stats / "heads_usage_per_layer.csv")
    assert usage == [["layer", "used_by_0", "used_by_1", "used_by_2", "used_by_3"], ["0", "1", "1", "1", "0"],
                     ["1", "0", "1", "1", "1"]]  # fmt: skip
    absolute = read_csv(stats / "overlap_absolute.csv")
    assert absolute == [["language", "en", "de", "ko"], ["en", "4", "3", "1"], ["de", "3", "4", "1"],
                        ["ko", "1", "1", "1"]]  # fmt: skip
    percent = read_csv(stats / "overlap_percent.csv")
    assert [float(x) for x in percent[1][1:]] == pytest.approx([100, 75, 25])
    cosine = read_csv(stats / "mask_cosine.csv")
    assert [float(x) for x in cosine[2][1:]] == pytest.approx([0.75, 1, 0.5])
    per_layer = read_csv(stats / "mask_cosine_per_layer.csv")
    assert per_layer[0] == ["layer", "language_a", "language_b", "cosine"] and len(per_layer) == 1 + 2 * 9
    rows = {(r[0], r[1], r[2]): r[3] for r in per_layer[1:]}
    assert rows[("0", "en", "ko")] == "nan"
    assert float(rows[("1", "de", "ko")]) == pytest.approx(1 / math.sqrt(3))


def test_table1_appends_majority_rate_and_degenerate_from_the_jsons(tmp_path):
    sub = tmp_path / "subnetworks"
    write_masks(sub, MASKS)
    rng = np.random.default_rng(name_seed("table1-outcome", tmp_path.name))
    outcome = {lang: (float(rng.uniform(0.3, 0.9)), bool(rng.integers(2))) for lang in ("en", "ko")}
    for lang, (rate, degenerate) in outcome.items():  # de stays a JSON from before these keys
        path = sub / f"{lang}.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "majority_rate": rate, "degenerate": degenerate}))
    write_mask_statistics(sub, LANGS)
    table = read_csv(sub / "stats" / "table1_disabled_heads.csv")
    assert table[0][:4] == ["language", "disabled_heads", "total_heads", "percent_disabled"]  # order kept
    assert table[0][4:] == ["majority_rate", "degenerate"]
    rows = {row[0]: row for row in table[1:]}
    assert [row[:3] for row in table[1:]] == [["en", "2", "6"], ["de", "2", "6"], ["ko", "5", "6"]]
    for lang, (rate, degenerate) in outcome.items():
        assert float(rows[lang][4]) == rate and rows[lang][5] == str(degenerate)
    assert rows["de"][4:] == ["", ""]


def test_statistics_reject_masks_of_another_shape(tmp_path):
    sub = tmp_path / "subnetworks"
    write_masks(sub, {"en": MASKS["en"], "de": np.ones((3, 3), dtype=int)})
    with pytest.raises(MaskError, match=r"de.json.*shape \(3, 3\).*\(2, 3\)"):
        write_mask_statistics(sub, ["en", "de"])
    with pytest.raises(MaskError, match="no languages"):
        write_mask_statistics(sub, [])
