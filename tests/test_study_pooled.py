"""The study's pooled findings read from synthetic runs: per-seed rankings written as the influence
stage writes them, with a known change of the in-language share in each seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.influence import TopKFile, save_topk, topk_path
from analysis.study.pooled import describe, pooled_influence, seed_roots

LANGS = ["en", "de"]
M, TRAIN_PER_LANG, TEST_PER_LANG = 10, 30, 40


def top_sets(rng: np.random.Generator, test_codes: np.ndarray, own_counts: np.ndarray) -> np.ndarray:
    """(n, M) training indices: ``own_counts[i]`` of test example i's language, the rest of the other."""
    rows = []
    for code, k in zip(test_codes, own_counts):
        own = rng.choice(TRAIN_PER_LANG, size=k, replace=False) + code * TRAIN_PER_LANG
        other = rng.choice(TRAIN_PER_LANG, size=M - k, replace=False) + (1 - code) * TRAIN_PER_LANG
        rows.append(np.r_[own, other])
    return np.asarray(rows, dtype=np.int64)


def write_ranking(run: Path, condition: str, pos_idx: np.ndarray, correct: np.ndarray, test_codes: np.ndarray,
                  method: str = "tracin", projection: str | None = None):
    n = pos_idx.shape[0]
    arrays = {
        "test_indices": np.arange(n, dtype=np.int64),
        "test_langs": np.array([LANGS[c] for c in test_codes]),
        "test_correct": correct,
        "pos_idx": pos_idx,
        "pos_score": np.zeros(pos_idx.shape),
        "neg_idx": pos_idx[:, ::-1].copy(),
        "neg_score": np.zeros(pos_idx.shape),
        "epochs": np.array([1]),
        "train_indices": np.arange(len(LANGS) * TRAIN_PER_LANG, dtype=np.int64),
        "train_langs": np.repeat(np.array(LANGS), TRAIN_PER_LANG),
    }
    meta = {"languages": LANGS, "m": M} | ({"projection": {"kind": projection}} if projection else {})
    save_topk(topk_path(run, condition, method), TopKFile(meta, arrays))


def write_seed(root: Path, seed: int, change: int, degenerate: bool = False) -> None:
    """A seed whose own-subnetwork rankings hold ``change`` more in-language examples (of M) per test example."""
    rng = np.random.default_rng(100 + seed)
    codes = np.repeat(np.arange(len(LANGS)), TEST_PER_LANG)
    base = rng.integers(3, 6, codes.size)
    own = np.clip(base + change + rng.integers(-1, 2, codes.size), 0, M)
    correct = rng.random(codes.size) > 0.2
    full = root / f"seed{seed}" / "full"
    write_ranking(full, "full", top_sets(rng, codes, base), correct, codes)
    (full / "config.yaml").write_text(f"seed_everything: {seed}\n")  # what crossling fit writes
    write_ranking(full, "own", top_sets(rng, codes, own), correct & (rng.random(codes.size) > 0.1), codes)
    (full / "subnetworks").mkdir(parents=True)
    for lang in LANGS:
        (full / "subnetworks" / f"{lang}.json").write_text(json.dumps({"degenerate": degenerate and lang == "de"}))


def own_vs_full(root: Path):
    return next(f for f in pooled_influence(root) if f.key == "own_vs_full")


def test_opposite_signs_across_seeds_are_not_marked_although_each_seed_excludes_zero(tmp_path):
    for seed, change in ((0, 3), (1, 3), (2, -3)):
        write_seed(tmp_path, seed, change)
    finding = own_vs_full(tmp_path)
    e = finding.effect
    assert e.seeds == [0, 1, 2] and e.groups == [*LANGS, "all"]
    assert ((e.per_seed_low > 0) | (e.per_seed_high < 0)).all(), "each seed on its own clears zero"
    assert not finding.marked.any()
    assert "no language's pooled interval clears zero" in describe(finding)


def test_a_change_every_seed_shows_is_marked_with_its_size(tmp_path):
    for seed in range(3):
        write_seed(tmp_path, seed, 2, degenerate=seed == 1)
    finding = own_vs_full(tmp_path)
    assert finding.marked.all() and (finding.effect.agree() == 3).all()
    # the pooled value is the mean over seeds of each seed's mean over its kept test examples
    assert finding.effect.pooled[-1] == pytest.approx(finding.effect.per_seed[:, -1].mean())
    assert 12 < finding.effect.pooled[-1] < 28  # 2 of 10 examples: +20 pp, less what the clip at 10 takes
    text = describe(finding)
    assert "held across seeds" in text and "en, de" in text
    assert "degenerate subnetworks" in text and "seed 1 de" in text and "seed 0" not in text.split("Beware")[1]


def test_seed_folders_are_found_by_their_fits_seed_and_a_one_seed_study_at_its_root(tmp_path):
    for folder, seed in (("seed10", 10), ("seed2", 2), ("seedling", 3), ("seed7", 8)):
        (tmp_path / "many" / folder / "full").mkdir(parents=True)
        (tmp_path / "many" / folder / "full" / "config.yaml").write_text(f"seed_everything: {seed}\n")
    (tmp_path / "many" / "seed5" / "full").mkdir(parents=True)  # no config: no fit wrote it
    # the seed is the fit's; a folder whose name is not the one the runner gives that seed is not a seed's
    assert seed_roots(tmp_path / "many") == {2: tmp_path / "many" / "seed2", 10: tmp_path / "many" / "seed10"}
    (tmp_path / "one" / "full").mkdir(parents=True)
    (tmp_path / "one" / "full" / "config.yaml").write_text("seed_everything: 4\n")
    assert seed_roots(tmp_path / "one") == {4: tmp_path / "one"}


def test_each_method_is_pooled_from_its_own_rankings(tmp_path):
    """A method's pooled change reads that method's rankings (``influence-<method>/``), not TracIn's: where TRAK
    ranks the own subnetwork's in-language examples lower and TracIn higher, the two pooled signs differ."""
    from analysis.influence import topk_path

    for seed in (0, 1):
        write_seed(tmp_path / "tracin", seed, change=3)
        write_seed(tmp_path / "trak", seed, change=-3)
        for condition in ("full", "own"):
            src = topk_path(tmp_path / "trak" / f"seed{seed}" / "full", condition)
            dst = topk_path(tmp_path / "tracin" / f"seed{seed}" / "full", condition, "trak")
            dst.parent.mkdir(parents=True)
            src.rename(dst)
    root = tmp_path / "tracin"
    by = {m: {f.key: f for f in pooled_influence(root, m)}["own_vs_full"] for m in ("tracin", "trak")}
    assert by["tracin"].effect.pooled[-1] > 20 and by["trak"].effect.pooled[-1] < -20  # 3 of m = 10: 30 pp
    assert by["tracin"].marked[-1] and by["trak"].marked[-1]
    # no REPSIM rankings: nothing pooled, not TracIn's numbers under another name
    assert pooled_influence(root, "repsim") == []


def test_the_projection_error_margin_applies_to_projected_rankings_only(tmp_path):
    """A share error measured for the sketches widens the margin of rankings over projected gradients
    (TracIn, TRAK), not of rankings over representations, which no projection moved."""
    rng = np.random.default_rng(7)
    codes = np.repeat(np.arange(len(LANGS)), TEST_PER_LANG)
    base = rng.integers(3, 6, codes.size)
    full, own = top_sets(rng, codes, base), top_sets(rng, codes, np.clip(base + 3, 0, M))
    correct = np.ones(codes.size, dtype=bool)
    run = tmp_path / "full"
    for method, kind in (("tracin", "kronecker"), ("repsim", "representation")):
        write_ranking(run, "full", full, correct, codes, method, kind)
        write_ranking(run, "own", own, correct, codes, method, kind)
    (run / "config.yaml").write_text("seed_everything: 0\n")
    error = {"mean": 45.0, "max": 60.0}
    (run / "fidelity").mkdir()
    (run / "fidelity" / "fidelity.json").write_text(json.dumps(
        {"share_error_pp": {"pos": error, "neg": error}, "n_test": 10, "n_train": 50, "m": 5, "epoch": 1}))
    by = {m: {f.key: f for f in pooled_influence(tmp_path, m)}["own_vs_full"] for m in ("tracin", "repsim")}
    assert by["tracin"].margin == 45.0 and by["repsim"].margin == 0.0
    assert by["tracin"].effect.pooled[-1] == pytest.approx(by["repsim"].effect.pooled[-1])  # the same rankings
    assert not by["tracin"].marked[-1] and by["repsim"].marked[-1]  # +30 pp clears 0, not 45 pp
