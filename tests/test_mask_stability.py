"""Subnetwork stability across training seeds, against slow, obviously-correct references."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from analysis.masks import MaskError
from analysis.study.mask_stability import (
    check_seed_masks,
    disabled_heads_over_seeds,
    expected_random_jaccard,
    jaccard,
    jaccard_matrix,
    language_stability,
    load_seed_masks,
    modularity,
    permutation_test,
    random_jaccard_baseline,
)
from analysis.study.mask_stability_files import CSV_HEADER, write_mask_stability

SHAPE = (6, 8)


def random_mask(rng: np.random.Generator, shape=SHAPE, density: float = 0.5) -> np.ndarray:
    """A fresh 0/1 mask with at least one enabled and one disabled head."""
    while True:
        mask = (rng.random(shape) < density).astype(np.int8)
        if 0 < mask.sum() < mask.size:
            return mask


def consistent_masks(rng, languages, seeds, noise: float = 0.05) -> dict[int, dict[str, np.ndarray]]:
    """Each language a fixed random mask, each seed flipping a few of its heads."""
    base = {g: random_mask(rng, density=rng.uniform(0.3, 0.7)) for g in languages}
    out = {}
    for s in seeds:
        out[s] = {}
        for g in languages:
            while True:
                m = (base[g] ^ (rng.random(SHAPE) < noise)).astype(np.int8)
                if m.any():
                    break
            out[s][g] = m
    return out


def independent_masks(rng, languages, seeds) -> dict[int, dict[str, np.ndarray]]:
    return {s: {g: random_mask(rng, density=rng.uniform(0.3, 0.7)) for g in languages} for s in seeds}


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa = {tuple(i) for i in np.argwhere(a == 1)}
    sb = {tuple(i) for i in np.argwhere(b == 1)}
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def brute_difference(masks, seeds, languages) -> float:
    """J_same − J_other straight from the definition, with the set-based Jaccard."""
    same, other = [], []
    for s, t in itertools.combinations(seeds, 2):
        for g in languages:
            for h in languages:
                (same if g == h else other).append(set_jaccard(masks[s][g], masks[t][h]))
    return float(np.mean(same) - np.mean(other))


# -- Jaccard and the random baseline ---------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "n"), [(3, 5, 12), (20, 30, 48), (70, 100, 144), (1, 1, 2), (10, 40, 48)])
def test_exact_random_jaccard_matches_monte_carlo(a, b, n):
    rng = np.random.default_rng(1000 + 7 * a + b)
    draws = 6000
    values = []
    for _ in range(draws):  # the definition, one draw at a time: two random sets, |A∩B| / |A∪B|
        sa, sb = set(rng.choice(n, a, replace=False).tolist()), set(rng.choice(n, b, replace=False).tolist())
        values.append(len(sa & sb) / len(sa | sb))
    values = np.array(values)
    se = values.std(ddof=1) / math.sqrt(draws)
    assert abs(expected_random_jaccard(a, b, n) - values.mean()) <= 4 * se + 1e-12


def test_exact_random_jaccard_at_the_edges():
    assert expected_random_jaccard(0, 0, 10) == 1.0  # two empty sets are the same set
    assert expected_random_jaccard(0, 4, 10) == 0.0
    assert expected_random_jaccard(10, 10, 10) == pytest.approx(1.0)
    assert expected_random_jaccard(3, 10, 10) == pytest.approx(0.3)  # B is everything: J = a / n
    assert expected_random_jaccard(4, 7, 10) == pytest.approx(expected_random_jaccard(7, 4, 10))
    assert 0 < expected_random_jaccard(500, 600, 1200) < 1  # big binomials do not overflow
    with pytest.raises(ValueError, match="a=11"):
        expected_random_jaccard(11, 3, 10)


def test_jaccard_equals_set_reference():
    rng = np.random.default_rng(11)
    for _ in range(60):
        shape = (int(rng.integers(1, 7)), int(rng.integers(1, 9)))
        a = random_mask(rng, shape, rng.uniform(0.1, 0.9)) if shape[0] * shape[1] > 1 else np.ones(shape)
        b = (rng.random(shape) < rng.uniform(0.1, 0.9)).astype(int)
        assert jaccard(a, b) == pytest.approx(set_jaccard(a, b))
    assert jaccard(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0
    with pytest.raises(MaskError, match="second mask"):
        jaccard(np.ones((2, 3)), np.ones((3, 2)))


def test_random_baseline_mean_is_exact_and_inside_its_range():
    sizes, n = [20, 25, 31], 48
    base = random_jaccard_baseline(sizes, n, "en")
    pairs = list(itertools.combinations(sizes, 2))
    assert base.mean == pytest.approx(np.mean([expected_random_jaccard(a, b, n) for a, b in pairs]))
    assert base.draws >= 2000
    assert base.low < base.mean < base.high
    # the range is of the mean over the 3 pairs: a slow reference covers ~95 % inside it
    rng = np.random.default_rng(5)
    ref = []
    for _ in range(800):
        drawn = [np.isin(np.arange(n), rng.choice(n, k, replace=False)).astype(int) for k in sizes]
        ref.append(np.mean([set_jaccard(drawn[i], drawn[j]) for i, j in itertools.combinations(range(3), 2)]))
    inside = np.mean((np.array(ref) >= base.low) & (np.array(ref) <= base.high))
    assert 0.91 <= inside <= 0.99


def test_draws_neither_use_nor_disturb_the_global_rng():
    rng = np.random.default_rng(21)
    masks = independent_masks(rng, ["en", "de", "ko", "zh", "fr"], [0, 1, 2])  # MC permutations
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    first = (permutation_test(masks), language_stability(masks)["de"].random_jaccard)
    assert (np.random.get_state()[1] == state).all()
    np.random.seed(2)
    assert (permutation_test(masks), language_stability(masks)["de"].random_jaccard) == first


# -- per language ----------------------------------------------------------------------------


def test_identical_masks_across_seeds_are_perfectly_stable():
    rng = np.random.default_rng(3)
    fixed = {g: random_mask(rng) for g in ("en", "de", "ko")}
    masks = {s: {g: m.copy() for g, m in fixed.items()} for s in (0, 4, 9)}
    stability = language_stability(masks)
    for g, m in fixed.items():
        st = stability[g]
        assert st.jaccard_across_seeds == 1.0
        assert (st.disabled_in_every_seed == (m == 0)).all()
        assert (st.disabled_in_no_seed == (m == 1)).all()
        assert st.enabled_heads == (int(m.sum()),) * 3
        assert st.random_jaccard.mean < 1.0
    rows = disabled_heads_over_seeds(masks)
    assert [(r["disabled_min"], r["disabled_max"], r["disabled_mean"]) for r in rows] == [
        (int((m == 0).sum()),) * 2 + (float((m == 0).sum()),) for m in fixed.values()
    ]


def test_always_and_never_disabled_heads_are_set_intersections():
    rng = np.random.default_rng(14)
    masks = consistent_masks(rng, ["en", "de"], [0, 1, 2], noise=0.15)
    for g, st in language_stability(masks).items():
        off = [{tuple(i) for i in np.argwhere(masks[s][g] == 0)} for s in masks]
        on = [{tuple(i) for i in np.argwhere(masks[s][g] == 1)} for s in masks]
        assert {tuple(i) for i in np.argwhere(st.disabled_in_every_seed)} == set.intersection(*off)
        assert {tuple(i) for i in np.argwhere(st.disabled_in_no_seed)} == set.intersection(*on)
        assert set.intersection(*off) != set.union(*off)  # the seeds do disagree somewhere


def test_table1_over_seeds_counts_disabled_heads_and_degenerate_seeds():
    rng = np.random.default_rng(4)
    masks = independent_masks(rng, ["en", "de"], [0, 1, 2])
    rows = disabled_heads_over_seeds(masks, {1: {"de": True}, 2: {"de": True, "en": False}})
    for row in rows:
        off = [SHAPE[0] * SHAPE[1] - int(masks[s][row["language"]].sum()) for s in (0, 1, 2)]
        assert (row["disabled_min"], row["disabled_max"]) == (min(off), max(off))
        assert row["disabled_mean"] == pytest.approx(np.mean(off))
    assert [r["degenerate_seeds"] for r in rows] == [0, 2]
    with pytest.raises(MaskError, match="seed 5"):
        disabled_heads_over_seeds(masks, {5: {"en": True}})


# -- modularity --------------------------------------------------------------------------------


def test_modularity_numbers_are_the_pairwise_means():
    rng = np.random.default_rng(6)
    langs, seeds = ["en", "de", "ko"], [0, 1, 2, 3]
    masks = consistent_masks(rng, langs, seeds, noise=0.2)
    mod = modularity(masks)
    cross = list(itertools.combinations(seeds, 2))
    same = [set_jaccard(masks[s][g], masks[t][g]) for s, t in cross for g in langs]
    other = [set_jaccard(masks[s][g], masks[t][h]) for s, t in cross for g in langs for h in langs if g != h]
    within = [
        set_jaccard(masks[s][g], masks[s][h]) for s in seeds for g, h in itertools.combinations(langs, 2)
    ]
    assert mod.j_same == pytest.approx(np.mean(same))
    assert mod.j_other == pytest.approx(np.mean(other))
    assert mod.j_within == pytest.approx(np.mean(within))
    assert mod.difference == pytest.approx(np.mean(same) - np.mean(other))
    for g in langs:
        own = [set_jaccard(masks[s][g], masks[t][g]) for s, t in cross]
        rest = [
            set_jaccard(masks[s][g], masks[t][h])
            for s in seeds
            for t in seeds
            if s != t
            for h in langs
            if h != g
        ]
        assert mod.same_by_language[g] == pytest.approx(np.mean(own))
        assert mod.other_by_language[g] == pytest.approx(np.mean(rest))
        assert language_stability(masks)[g].jaccard_across_seeds == pytest.approx(np.mean(own))
    matrix, labels = jaccard_matrix(masks)
    assert labels[:5] == [("en", 0), ("en", 1), ("en", 2), ("en", 3), ("de", 0)]
    for (i, (g, s)), (j, (h, t)) in itertools.product(enumerate(labels), repeat=2):
        assert matrix[i, j] == pytest.approx(set_jaccard(masks[s][g], masks[t][h]))


@pytest.mark.parametrize(("n_langs", "exact"), [(4, True), (5, False)])  # 4!^2 = 576 relabelings; 5!^2 > 2000
def test_language_consistent_masks_are_modular(n_langs, exact):
    rng = np.random.default_rng(7 + n_langs)
    langs = ["en", "de", "ko", "zh", "fr"][:n_langs]
    masks = consistent_masks(rng, langs, [0, 1, 2])
    mod = modularity(masks)
    assert mod.j_same > mod.j_other + 0.3
    assert all(mod.same_by_language[g] > mod.other_by_language[g] for g in langs)
    test = permutation_test(masks)
    assert test.exact is exact
    assert test.observed == pytest.approx(mod.difference)
    assert test.p_value <= 0.005


def test_independent_masks_are_not_modular():
    rng = np.random.default_rng(8)
    masks = independent_masks(rng, ["en", "de", "ko", "zh"], [0, 1, 2])
    test = permutation_test(masks)
    assert abs(test.observed) < 0.1
    assert test.p_value > 0.1


def test_permutation_p_is_the_share_of_relabelings_at_least_as_modular():
    """Against every relabeling of every seed (seed 0 included: fixing it must not matter)."""
    rng = np.random.default_rng(9)
    langs, seeds = ["en", "de", "ko"], [0, 1, 2]
    masks = consistent_masks(rng, langs, seeds, noise=0.3)
    observed = brute_difference(masks, seeds, langs)
    stats = []
    for perms in itertools.product(itertools.permutations(langs), repeat=len(seeds)):
        relabeled = {s: {g: masks[s][p[i]] for i, g in enumerate(langs)} for s, p in zip(seeds, perms)}
        stats.append(brute_difference(relabeled, seeds, langs))
    expected = np.mean(np.array(stats) >= observed - 1e-12)
    test = permutation_test(masks)
    assert test.exact and test.n_permutations == 36
    assert test.p_value == pytest.approx(expected)
    assert 0 < expected < 1


# -- input -------------------------------------------------------------------------------------


def test_mismatched_languages_or_shapes_are_refused_naming_the_seed():
    rng = np.random.default_rng(10)
    good = independent_masks(rng, ["en", "de"], [0, 3, 7])
    assert check_seed_masks(good) == ([0, 3, 7], ["en", "de"], SHAPE)
    missing = {**good, 7: {"en": good[7]["en"]}}
    with pytest.raises(ValueError, match=r"seed 7: no mask for language 'de'"):
        modularity(missing)
    extra = {**good, 3: {**good[3], "ko": random_mask(rng)}}
    with pytest.raises(ValueError, match=r"seed 3: mask for language 'ko'"):
        language_stability(extra)
    other_shape = {**good, 3: {"en": good[3]["en"], "de": random_mask(rng, (6, 4))}}
    with pytest.raises(ValueError, match=r"seed 3, language 'de'.*shape \(6, 4\)"):
        permutation_test(other_shape)
    not_binary = {**good, 7: {"en": good[7]["en"] * 2, "de": good[7]["de"]}}
    with pytest.raises(ValueError, match=r"seed 7, language 'en'"):
        check_seed_masks(not_binary)
    with pytest.raises(ValueError, match="at least 2 training seeds"):
        check_seed_masks({0: good[0]})


def _write_subnetwork(path, lang, mask, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"language": lang, "mask": mask.tolist(), **extra}))


def test_load_seed_masks_reads_masks_and_optional_keys(tmp_path):
    rng = np.random.default_rng(12)
    masks = independent_masks(rng, ["en", "de"], [0, 1])
    dirs = {s: tmp_path / f"seed{s}" / "subnetworks" for s in masks}
    for s, per in masks.items():
        for g, m in per.items():
            extra = {"disabled_heads": int(m.size - m.sum())} if g == "en" else {}
            if (s, g) == (1, "de"):
                extra["degenerate"] = True
            _write_subnetwork(dirs[s] / f"{g}.json", g, m, **extra)
    loaded = load_seed_masks(dirs)
    for s, per in masks.items():
        assert sorted(loaded.masks[s]) == ["de", "en"]
        for g, m in per.items():
            assert (loaded.masks[s][g] == m).all()
    assert loaded.degenerate == {0: {"de": False, "en": False}, 1: {"de": True, "en": False}}
    assert loaded.disabled_heads[0]["en"] == int(masks[0]["en"].size - masks[0]["en"].sum())
    assert loaded.disabled_heads[1]["de"] is None
    assert list(load_seed_masks(dirs, ["en"]).masks[0]) == ["en"]

    _write_subnetwork(dirs[1] / "ko.json", "ko", random_mask(rng))
    with pytest.raises(MaskError, match=r"seed 1: mask for language 'ko'"):
        load_seed_masks(dirs)
    _write_subnetwork(dirs[0] / "ko.json", "ko", random_mask(rng), degenerate="yes")
    with pytest.raises(MaskError, match=r"seed0/subnetworks/ko\.json: key 'degenerate'"):
        load_seed_masks(dirs, ["ko"])


# -- files -------------------------------------------------------------------------------------


def test_writer_writes_every_file_atomically_and_csv_matches_functions(tmp_path):
    rng = np.random.default_rng(13)
    langs, seeds = ["en", "de", "ko"], [0, 1, 2]
    masks = consistent_masks(rng, langs, seeds, noise=0.1)
    degenerate = {2: {"ko": True}}
    out = tmp_path / "stability"
    files = write_mask_stability(masks, degenerate, out)

    names = {
        "mask_stability.csv",
        "mask_stability_summary.json",
        "mask_jaccard_matrix.csv",
        "mask_stability.png",
        "mask_jaccard_matrix.png",
    }
    assert {p.name for p in files.values()} == names
    assert {p.name for p in out.iterdir()} == names  # no temporary file left behind
    for path in files.values():
        assert path.stat().st_size > 0
    assert (out / "mask_stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stability = language_stability(masks)
    table = {r["language"]: r for r in disabled_heads_over_seeds(masks, degenerate)}
    mod = modularity(masks)
    with (out / "mask_stability.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CSV_HEADER
    assert [r["language"] for r in rows] == langs
    for row in rows:
        g = row["language"]
        st = stability[g]
        assert float(row["jaccard_across_seeds"]) == st.jaccard_across_seeds
        assert float(row["random_jaccard"]) == st.random_jaccard.mean
        assert float(row["jaccard_to_other_languages"]) == mod.other_by_language[g]
        assert int(row["disabled_in_every_seed"]) == int(st.disabled_in_every_seed.sum())
        assert int(row["disabled_in_no_seed"]) == int(st.disabled_in_no_seed.sum())
        assert int(row["enabled_heads_min"]) == min(st.enabled_heads)
        assert int(row["enabled_heads_max"]) == max(st.enabled_heads)
        for key in ("disabled_min", "disabled_max", "degenerate_seeds"):
            assert int(row[key]) == table[g][key]
        assert float(row["disabled_mean"]) == table[g]["disabled_mean"]
    assert [int(r["degenerate_seeds"]) for r in rows] == [0, 0, 1]

    summary = json.loads((out / "mask_stability_summary.json").read_text())
    test = permutation_test(masks)
    assert summary["j_same"] == mod.j_same and summary["j_other"] == mod.j_other
    assert summary["j_within"] == mod.j_within and summary["difference"] == mod.difference
    assert summary["permutation_p"] == test.p_value
    assert summary["random_jaccard"] == pytest.approx(
        np.mean([stability[g].random_jaccard.mean for g in langs])
    )
    assert (summary["n_seeds"], summary["languages"], summary["degenerate_masks"]) == (3, langs, 1)

    with (out / "mask_jaccard_matrix.csv").open() as fh:
        matrix_rows = list(csv.reader(fh))
    assert matrix_rows[0][1:4] == ["en/s0", "en/s1", "en/s2"]
    matrix, _ = jaccard_matrix(masks)
    assert np.array([[float(v) for v in r[1:]] for r in matrix_rows[1:]]).tolist() == matrix.tolist()
