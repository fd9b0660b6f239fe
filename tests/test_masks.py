"""Named masks and conditions (analysis/masks.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.masks import (
    MaskError,
    condition_masks,
    load_subnetwork,
    load_subnetworks,
    name_seed,
    resolve_mask,
    shuffle_mask,
)

SHAPE = (4, 6)


def random_masks(seed: str, languages=("en", "de", "ko")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(name_seed(seed))
    return {lang: (rng.uniform(size=SHAPE) < 0.6).astype(np.int8) for lang in languages}


def write_subnetwork(directory, lang, mask, **extra):
    path = directory / f"{lang}.json"
    path.write_text(json.dumps({"language": lang, "mask": np.asarray(mask).tolist(), **extra}))
    return path


def test_name_seed_is_stable_and_distinguishes_names():
    assert name_seed("random", 0, "de") == name_seed("random", 0, "de")
    assert name_seed("random", 0, "de") != name_seed("random", 1, "de")
    assert name_seed("random", 0, "de") != name_seed("random", 0, "en")
    assert name_seed("ab", "c") != name_seed("a", "bc")  # parts are separated
    np.random.seed(1)
    first = name_seed("x")
    np.random.seed(2)
    assert name_seed("x") == first and 0 <= first < 2**64


def test_shuffle_keeps_sparsity_and_differs_by_seed():
    mask = random_masks("shuffle")["de"]
    shuffled = {seed: shuffle_mask(mask, seed, "de") for seed in range(3)}
    for out in shuffled.values():
        assert out.shape == mask.shape and out.dtype == np.int8
        assert out.sum() == mask.sum()
        assert set(np.unique(out)) <= {0, 1}
    assert not np.array_equal(shuffled[0], shuffled[1]) and not np.array_equal(shuffled[1], shuffled[2])
    assert np.array_equal(shuffle_mask(mask, 0, "de"), shuffled[0])  # deterministic from the name
    assert not np.array_equal(shuffle_mask(mask, 0, "en"), shuffled[0])
    assert np.array_equal(mask, random_masks("shuffle")["de"])  # input untouched


def test_resolve_named_masks():
    subnetworks = random_masks("resolve")
    full = resolve_mask("full", subnetworks, SHAPE)
    assert full.shape == SHAPE and (full == 1).all()
    de = resolve_mask("de", subnetworks, SHAPE)
    assert np.array_equal(de, subnetworks["de"])
    de[0, 0] = 1 - de[0, 0]
    assert not np.array_equal(de, subnetworks["de"])  # a copy: callers cannot corrupt the source
    assert np.array_equal(
        resolve_mask("random2-ko", subnetworks, SHAPE), shuffle_mask(subnetworks["ko"], 2, "ko")
    )
    union = resolve_mask("union-de-en", subnetworks, SHAPE)
    inter = resolve_mask("intersect-de-en", subnetworks, SHAPE)
    a, b = subnetworks["de"], subnetworks["en"]
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            assert union[i, j] == (1 if a[i, j] or b[i, j] else 0)
            assert inter[i, j] == (1 if a[i, j] and b[i, j] else 0)
    assert 0 < inter.sum() < union.sum()


def test_resolve_errors():
    subnetworks = random_masks("resolve-errors")
    with pytest.raises(MaskError, match="unknown mask 'fr'"):
        resolve_mask("fr", subnetworks, SHAPE)
    with pytest.raises(MaskError, match="unknown mask 'xx'"):
        resolve_mask("union-de-xx", subnetworks, SHAPE)
    with pytest.raises(MaskError, match=r"'de'.*shape \(4, 6\).*\(3, 6\)"):
        resolve_mask("de", subnetworks, (3, 6))


def test_conditions_resolve_as_specified():
    langs = ["en", "fr", "de"]
    assert condition_masks("full", langs) == {"en": "full", "fr": "full", "de": "full"}
    assert condition_masks("own", langs) == {"en": "en", "fr": "fr", "de": "de"}
    assert condition_masks("random7", langs) == {"en": "random7-en", "fr": "random7-fr", "de": "random7-de"}
    assert condition_masks("as-en", langs) == {"en": "en", "fr": "en", "de": "en"}
    assert condition_masks("union-de-en", langs) == {"de": "union-de-en", "en": "union-de-en"}
    assert condition_masks("intersect-fr-ko", langs) == {"fr": "intersect-fr-ko"}
    with pytest.raises(MaskError, match="neither"):
        condition_masks("union-ko-zh", langs)
    for bad in ("random", "own-en", "as-", "union-de"):
        with pytest.raises(MaskError, match="unknown condition"):
            condition_masks(bad, langs)


def test_load_subnetworks(tmp_path):
    masks = random_masks("load")
    for lang, mask in masks.items():
        write_subnetwork(tmp_path, lang, mask)
    loaded = load_subnetworks(tmp_path, ["ko", "en"], SHAPE)
    assert list(loaded) == ["ko", "en"]
    assert all(np.array_equal(loaded[lang], masks[lang]) and loaded[lang].dtype == np.int8 for lang in loaded)
    assert np.array_equal(load_subnetwork(tmp_path / "de.json"), masks["de"])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(MaskError, match="not found.*nope.json"):
        load_subnetwork(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"mask": [[1, 0]')
    with pytest.raises(MaskError, match="broken.json: not valid JSON"):
        load_subnetwork(tmp_path / "broken.json")
    (tmp_path / "nomask.json").write_text('{"importance": []}')
    with pytest.raises(MaskError, match="nomask.json.*key 'mask'.*importance"):
        load_subnetwork(tmp_path / "nomask.json")
    (tmp_path / "ragged.json").write_text('{"mask": [[1, 0], [1]]}')
    with pytest.raises(MaskError, match="ragged.json.*rectangular"):
        load_subnetwork(tmp_path / "ragged.json")
    (tmp_path / "values.json").write_text('{"mask": [[1, 2], [0, 1]]}')
    with pytest.raises(MaskError, match="values.json.*0/1"):
        load_subnetwork(tmp_path / "values.json")
    write_subnetwork(tmp_path, "de", np.ones((3, 6)))
    with pytest.raises(MaskError, match=r"de.json.*shape \(3, 6\), the model has \(4, 6\)"):
        load_subnetwork(tmp_path / "de.json", SHAPE)


def test_load_subnetworks_checks_languages_and_shapes(tmp_path):
    write_subnetwork(tmp_path, "en", np.ones(SHAPE))
    write_subnetwork(tmp_path, "ko", np.ones((2, 6)))
    with pytest.raises(MaskError, match=r"ko.json.*shape \(2, 6\).*\(4, 6\)"):
        load_subnetworks(tmp_path, ["en", "ko"])  # no shape given: the first file sets it
    (tmp_path / "fr.json").write_text(json.dumps({"language": "de", "mask": np.ones(SHAPE).tolist()}))
    with pytest.raises(MaskError, match="fr.json.*'de', expected 'fr'"):
        load_subnetworks(tmp_path, ["fr"])
    with pytest.raises(MaskError, match="directory not found"):
        load_subnetworks(tmp_path / "missing", ["en"])
