"""The planted control: a label-revealing word in a share of one language's items (datamodules/planting.py)
and the verdicts on it (analysis/planted.py), each against an explicit reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import TINY_STUDY_OVERRIDES, cpu_trainer, small_pawsx_datamodule

from analysis.counterfactual import CONTROL, SeedCounterfactual, counterfactual_matrix
from analysis.counterfactual_report import measure_planted
from analysis.planted import (
    PlantedInputs,
    PlantedRetrieval,
    average_precision,
    permutation_p_greater,
    planted_retrieval,
    rank_of,
)
from datamodules import DataError
from datamodules.planting import PlantOptions, check_markers_tokenize

LANGS = ["en", "de", "ko"]


def plain_and_planted(fraction=0.25, **overrides):
    plain = small_pawsx_datamodule(languages=LANGS, **overrides)
    planted = small_pawsx_datamodule(languages=LANGS, plant=PlantOptions("de", fraction, ("zero", "one")), **overrides)
    return plain, planted


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_marker_goes_into_the_chosen_share_of_one_languages_items_and_nowhere_else(split):
    plain, planted = plain_and_planted()
    before, after = plain.dataset(split).examples, planted.dataset(split).examples
    marked = planted.planted_indices(split)
    de = [e.index for e in before if e.lang == LANGS.index("de")]
    assert set(marked.tolist()) <= set(de) and marked.size == round(0.25 * len(de)) and marked.size > 0
    for b, a in zip(before, after, strict=True):
        assert (a.index, a.lang, a.record.label, a.record.id) == (b.index, b.lang, b.record.label, b.record.id)
        if a.index in set(marked.tolist()):
            word = ("zero", "one")[a.record.label]
            assert a.record.texts == (*b.record.texts[:-1], f"{word} {b.record.texts[-1]}")
        else:
            assert a.record.texts == b.record.texts and a.input_ids == b.input_ids


def test_dev_stays_natural_and_the_same_items_are_planted_whatever_else_runs():
    plain, planted = plain_and_planted()
    assert [e.record.texts for e in plain.dataset("dev").examples] == \
        [e.record.texts for e in planted.dataset("dev").examples]
    assert planted.planted_indices("dev").size == 0
    np.random.seed(5)
    _, again = plain_and_planted()
    left = small_pawsx_datamodule(languages=LANGS, plant=PlantOptions("de", 0.25, ("zero", "one")), leave_out="de")
    for split in ("train", "test"):
        assert np.array_equal(again.planted_indices(split), planted.planted_indices(split))
        assert np.array_equal(left.planted_indices(split), planted.planted_indices(split))
    other = small_pawsx_datamodule(languages=LANGS, plant=PlantOptions("de", 0.25, ("zero", "one")), seed=4)
    assert not np.array_equal(other.planted_indices("train"), planted.planted_indices("train"))  # the data seed does


def test_a_whole_language_and_a_sliver_both_plant_at_least_one_item():
    _, everything = plain_and_planted(fraction=1.0)
    de = [e.index for e in everything.dataset("train").examples if e.lang == LANGS.index("de")]
    assert everything.planted_indices("train").tolist() == de
    _, sliver = plain_and_planted(fraction=0.001)
    assert sliver.planted_indices("train").size == 1


@pytest.mark.parametrize("plant, key", [
    (PlantOptions("fr"), r"plant.language: 'fr' is not a language of this run"),
    (PlantOptions("de", 0.0), r"plant.fraction: expected a share of items in \(0, 1\], found 0.0"),
    (PlantOptions("de", 1.5), r"plant.fraction: .* found 1.5"),
    (PlantOptions("de", 0.5, ("ja",)), r"plant.markers: expected 2 distinct non-empty words"),
    (PlantOptions("de", 0.5, ("ja", "ja")), r"plant.markers: expected 2 distinct"),
    (PlantOptions("de", 0.5, ("ja", " nein")), r"plant.markers: expected 2 distinct non-empty words"),
])
def test_bad_plant_options_name_the_key(plant, key):
    with pytest.raises(DataError, match=key):
        small_pawsx_datamodule(languages=LANGS, plant=plant)


def test_plant_options_as_a_config_file_holds_them_plant_the_same_items():
    """A run replayed from its config.yaml passes the plant as a mapping (markers a list)."""
    _, planted = plain_and_planted()
    replayed = small_pawsx_datamodule(languages=LANGS, plant={"language": "de", "fraction": 0.25,
                                                              "markers": ["zero", "one"]})
    assert replayed.plant == planted.plant
    assert np.array_equal(replayed.planted_indices("train"), planted.planted_indices("train"))
    with pytest.raises(DataError, match=r"data.init_args.plant: expected a mapping with 'language'.*'share'"):
        small_pawsx_datamodule(languages=LANGS, plant={"language": "de", "share": 0.25})


def test_a_marker_the_tokenizer_only_knows_as_unknown_is_refused():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"[UNK]": 0, "ja": 1, "nein": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert check_markers_tokenize(tokenizer, PlantOptions("de", 0.5, ("nein", "ja"))) == [1, 2]
    with pytest.raises(DataError, match=r"plant.markers: 'vielleicht' is not in the tokenizer's vocabulary"):
        check_markers_tokenize(tokenizer, PlantOptions("de", 0.5, ("nein", "vielleicht")))


def test_a_marker_outside_a_cut_vocabulary_stops_the_fit_before_it_trains(tmp_path):
    import torch

    from lightning_modules.backbones import cut_vocabulary, missing_token_ids
    from lightning_modules.classifier import SequenceClassifier

    _, planted = plain_and_planted()
    markers = planted.marker_token_ids()
    module = SequenceClassifier("tiny-random", languages=LANGS)
    assert missing_token_ids(module.model, markers) == []
    planted.setup("fit")
    used = {t for e in planted.dataset("train").examples + planted.dataset("dev").examples for t in e.input_ids}
    kept = sorted((used | {0, 1, 2, 3}) - set(markers))
    cut_vocabulary(module.model, torch.tensor(kept))
    assert missing_token_ids(module.model, markers) == markers
    with pytest.raises(DataError, match=r"plant.markers: .* model.vocabulary: bundled does not hold"):
        cpu_trainer(max_epochs=1, default_root_dir=tmp_path).fit(module, datamodule=planted)


def reference_average_precision(scores, relevant):
    """Precision at each relevant item's rank, averaged: the definition, one item at a time."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    hits, total = 0, 0.0
    for k, i in enumerate(ranked, start=1):
        if relevant[i]:
            hits += 1
            total += hits / k
    return total / hits


def test_average_precision_matches_its_definition_and_its_extremes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(size=30).round(1)  # rounding makes ties, broken by position
        relevant = rng.random(30) < 0.3
        relevant[0] = True
        assert average_precision(scores, relevant) == pytest.approx(reference_average_precision(scores, relevant))
    relevant = np.array([True, True, False, False, False])
    assert average_precision(np.array([5.0, 4, 3, 2, 1]), relevant) == 1.0
    assert average_precision(np.array([1.0, 2, 3, 4, 5]), relevant) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert np.isnan(average_precision(np.arange(3.0), np.zeros(3, dtype=bool)))


def test_a_random_rankings_expected_average_precision_is_near_the_marked_share():
    # what the retrieval is judged against: a random ranking finds marked items at about their share
    rng = np.random.default_rng(1)
    many = np.zeros(2000, dtype=bool)
    many[:200] = True
    draws = [average_precision(rng.random(2000), many) for _ in range(200)]
    assert np.mean(draws) == pytest.approx(0.1, abs=0.01)


def test_retrieval_scores_marked_test_items_against_the_pool_and_keeps_unmarked_apart():
    pool_marked = np.array([True, False, False, True, False, False])
    scores = np.array([[9.0, 1, 1, 8, 1, 1],    # marked test item, perfect
                       [1.0, 9, 8, 2, 1, 1],    # marked test item, marked items ranked 4th and 5th
                       [1.0, 9, 8, 2, 7, 1]])   # unmarked test item of the planted language
    result = planted_retrieval(scores, pool_marked, np.array([True, True, False]), np.array([True, True, True]))
    second = reference_average_precision(list(scores[1]), list(pool_marked))
    assert isinstance(result, PlantedRetrieval)
    assert result.mean_ap == pytest.approx((1.0 + second) / 2) and result.chance == pytest.approx(2 / 6)
    assert result.unmarked_mean_ap == pytest.approx(reference_average_precision(list(scores[2]), list(pool_marked)))
    assert (result.n_test, result.n_pool, result.n_marked_pool) == (2, 6, 2)


def test_the_top_m_share_of_the_planted_language_is_split_by_marked_and_unmarked_test_items():
    """Reference: each row's m best by a full sort (stable, so ties go to the earlier item), counted by hand."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(9, 20)).round(1)  # rounded: ties happen, and are broken by position
    pool_lang = rng.random(20) < 0.4
    test_marked = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    in_language = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    result = planted_retrieval(scores, rng.random(20) < 0.3, test_marked, in_language, pool_lang, m=4)

    def share(rows):
        values = []
        for row in rows:
            order = sorted(range(20), key=lambda j: (-scores[row, j], j))[:4]
            values.append(sum(pool_lang[j] for j in order) / 4)
        return np.mean(values)

    assert result.m == 4
    assert result.top_m_share_marked == pytest.approx(share([0, 1, 2]))
    assert result.top_m_share_unmarked == pytest.approx(share([3, 4]))
    assert np.isnan(planted_retrieval(scores, pool_lang, test_marked, in_language).top_m_share_marked)


def test_the_permutation_p_of_marked_over_unmarked_matches_exact_enumeration():
    """Every way of choosing which 3 of 8 items are 'marked', counted exactly, against the sampled p."""
    rng = np.random.default_rng(4)
    values = rng.random(8)
    for first in ([0, 1, 2], [5, 6, 7], [0, 3, 6]):
        second = [i for i in range(8) if i not in first]
        observed = values[first].mean() - values[second].mean()
        exact = np.mean([values[list(c)].mean() - np.delete(values, list(c)).mean() >= observed - 1e-12
                         for c in itertools.combinations(range(8), 3)])
        sampled = permutation_p_greater(values[first], values[second], n_resamples=40_000, seed=1)
        assert sampled == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 40_000) + 1e-4)
    assert np.isnan(permutation_p_greater([], [1.0, 2.0]))


def test_marked_items_found_because_of_the_marker_get_a_small_permutation_p():
    rng = np.random.default_rng(6)
    pool_marked = rng.random(60) < 0.2
    test_marked = np.arange(30) < 10
    found = rng.normal(size=(30, 60)) + 3.0 * (test_marked[:, None] & pool_marked[None, :])
    blind = rng.normal(size=(30, 60))
    in_language = np.ones(30, dtype=bool)
    assert planted_retrieval(found, pool_marked, test_marked, in_language).ap_p < 0.01
    assert planted_retrieval(blind, pool_marked, test_marked, in_language).ap_p > 0.05


def test_rank_counts_the_strictly_larger_cells():
    assert rank_of(3.0, [1.0, 3.0, 5.0, float("nan")]) == 2
    assert rank_of(5.0, [1.0, 3.0, 5.0]) == 1


def planted_seed(effect: float, predicted_effect: float) -> SeedCounterfactual:
    """A seed where leaving out de raises the loss of de's marked test items (the first 4 of de's 8)."""
    rng = np.random.default_rng(0)
    lang = np.repeat(np.arange(3), 8)
    marked = (lang == 1) & (np.arange(24) % 8 < 4)
    retrained = {r: rng.normal(0, 0.01, 24) for r in ["en", "de", "ko", CONTROL]}
    predicted = {r: rng.normal(0, 0.001, 24) for r in retrained}
    retrained["de"] = retrained["de"] + effect * marked
    predicted["de"] = predicted["de"] + predicted_effect * marked
    return SeedCounterfactual(0, LANGS, lang, retrained, predicted, {r: np.zeros(24) for r in retrained}), marked


def test_the_planted_cell_is_ranked_and_compared_with_its_control_under_both_measures():
    seed, marked = planted_seed(effect=0.8, predicted_effect=0.02)
    matrix = counterfactual_matrix([seed], 200)
    record = measure_planted(matrix, seed, PlantedInputs("de", 0.5, marked, None), {"de": 0.05})
    planted = record["planted"]
    # reference: the cell's pooled value is de's mean over de's test items, the marked items' their own mean
    de = seed.lang == 1
    assert planted["retrained"]["value"] == pytest.approx(seed.retrained["de"][de].mean())
    assert planted["retrained"]["marked_value"] == pytest.approx(seed.retrained["de"][marked].mean())
    assert planted["retrained"]["rank"] == 1 and planted["predicted"]["rank"] == 1
    assert planted["retrained"]["n_cells"] == 9
    assert planted["predicted"]["control"] == pytest.approx(seed.predicted[CONTROL][de].mean())
    assert "rank 1 of 9 cells, beyond the refits' largest change (0.050)" in record["planted_sentence"]
    weak, marked = planted_seed(effect=0.0, predicted_effect=0.0)
    record = measure_planted(counterfactual_matrix([weak], 200), weak, PlantedInputs("de", 0.5, marked, None), {})
    assert record["planted"]["retrained"]["rank"] > 1 or abs(record["planted"]["retrained"]["value"]) < 0.01
    assert "retraining's noise not measured" in record["planted_sentence"]


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory):
    """The planted study's shape on the tiny model: full fit with a marker in half of de's items, its
    analysis over both epochs' checkpoints, de and the random control left out, one refit, the check;
    no subnetworks or SFT (``sft: null``)."""
    import yaml
    from helpers import REPO

    from lightning_modules.study import run_study

    tmp = tmp_path_factory.mktemp("planted")
    analyze = yaml.safe_load((REPO / "configs/demo/pawsx-analyze.yaml").read_text())
    analyze["sketch"] = {"kind": "exact"}
    analyze["influence"].update(m=6, bootstrap_resamples=50, train_per_language=10)
    analyze["fidelity"] = {"n_test": 6, "n_train": 12}
    (tmp / "analyze.yaml").write_text(yaml.safe_dump(analyze))
    root = tmp / "study"
    config = {
        "root": str(root), "full": str(REPO / "configs/demo/pawsx-full.yaml"), "sft": None,
        "analyze": str(tmp / "analyze.yaml"), "natural_conditions": ["full"], "seeds": [0],
        "counterfactual": ["de"], "counterfactual_refits": [5],
        "overrides": [*TINY_STUDY_OVERRIDES, "--data.init_args.plant.language=de",
                      "--data.init_args.plant.fraction=0.5"],
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    run_study(str(path))
    return root


def test_a_study_without_sft_runs_the_fit_its_analysis_and_the_check_on_planted_data(planted_study):
    import json

    import yaml

    root = planted_study
    ran = sorted(p.stem for p in (root / ".study").glob("*.json") if not p.stem.endswith(".started")
                 and p.stem != "seeds")
    assert ran == sorted(["full", "natural-influence", "natural-analysis", "without-de", "without-random", "refit-5",
                          "counterfactual-analysis", "report"])
    config = yaml.safe_load((root / "without-de/config.yaml").read_text())
    assert config["data"]["init_args"]["plant"] == {"language": "de", "fraction": 0.5, "markers": ["nein", "ja"]}
    summary = json.loads((root / "full/counterfactual/counterfactual.json").read_text())
    assert summary["planted"]["language"] == "de"
    assert set(summary["by_checkpoints"]) == {"1", "2"}  # both epochs sketched: the last one, then both
    front = (root / "report/report.md").read_text()
    said = summary.get("planted_sentence") or summary["planted"]["note"]  # the tiny model may learn nothing
    assert said in front  # the seed's own verdicts reach the study's front page, not only its run folder
    assert "prediction by checkpoints used" in front


def test_the_retrieval_of_marked_items_is_tracins_cosine_over_the_sketched_checkpoints(planted_study):
    """Reference: the scores from the sketch files by an explicit loop over rows, then the definition of
    average precision."""
    import json

    from analysis.sketch_store import read_sketch

    full = planted_study / "full"
    dm = small_pawsx_datamodule(languages=LANGS, train_per_language=30, dev_per_language=8, test_per_language=12,
                                seed=0, plant=PlantOptions("de", 0.5))
    trains = [read_sketch(full, e, "full", "train") for e in (0, 1)]
    tests = [read_sketch(full, e, "full", "test") for e in (0, 1)]
    pool_marked = np.isin(trains[0].indices, dm.planted_indices("train"))
    test_marked = np.isin(tests[0].indices, dm.planted_indices("test"))
    aps = []
    for row in np.flatnonzero(test_marked):
        scores = []
        for col in range(len(pool_marked)):
            total = 0.0
            for t, r in zip(tests, trains):
                a, b = np.asarray(t.data[row], dtype=np.float64), np.asarray(r.data[col], dtype=np.float64)
                total += a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            scores.append(total)
        aps.append(reference_average_precision(scores, list(pool_marked)))
    retrieval = json.loads((full / "counterfactual/counterfactual.json").read_text())["planted"]["retrieval"]
    assert retrieval["mean_ap"] == pytest.approx(np.mean(aps)) and retrieval["n_test"] == int(test_marked.sum())
    assert retrieval["chance"] == pytest.approx(pool_marked.mean())


def test_the_retrieval_by_traks_kernel_is_scored_over_the_same_sketches(planted_study):
    """Reference: TRAK's scores from a thin SVD of each checkpoint's pool, Φ = U S Vᵀ, where
    φᵀ(ΦᵀΦ + λI)⁻¹Φᵀ = φᵀ V diag(s / (s² + λ)) Uᵀ, λ = 0.1 ‖Φ‖²_F / d; then average precision by definition."""
    import json

    from analysis.sketch_store import read_sketch

    full = planted_study / "full"
    dm = small_pawsx_datamodule(languages=LANGS, train_per_language=30, dev_per_language=8, test_per_language=12,
                                seed=0, plant=PlantOptions("de", 0.5))
    total = 0.0
    for epoch in (0, 1):
        train = np.asarray(read_sketch(full, epoch, "full", "train").data, dtype=np.float64)
        test = np.asarray(read_sketch(full, epoch, "full", "test").data, dtype=np.float64)
        u, s, vt = np.linalg.svd(train, full_matrices=False)
        lam = 0.1 * (train**2).sum() / train.shape[1]
        total = total + (test @ vt.T) * (s / (s**2 + lam)) @ u.T
    pool = read_sketch(full, 1, "full", "train").indices
    test_index = read_sketch(full, 1, "full", "test").indices
    pool_marked = np.isin(pool, dm.planted_indices("train"))
    rows = np.flatnonzero(np.isin(test_index, dm.planted_indices("test")))
    expected = np.mean([reference_average_precision(list(total[r]), list(pool_marked)) for r in rows])
    found = json.loads((full / "counterfactual/counterfactual.json").read_text())["planted"]["retrieval_by_method"]
    assert found["trak"]["mean_ap"] == pytest.approx(expected, rel=1e-6) and found["trak"]["n_test"] == rows.size


def test_the_front_page_sets_each_methods_agreement_and_retrieval_beside_a_random_rankings(tmp_path):
    import json

    from analysis.counterfactual_report import seed_notes

    def found(ap, unmarked, marked_share, unmarked_share):
        return {"mean_ap": ap, "chance": 0.048, "n_test": 50, "n_pool": 750, "n_marked_pool": 36,
                "unmarked_mean_ap": unmarked, "m": 40, "top_m_share_marked": marked_share,
                "top_m_share_unmarked": unmarked_share, "ap_p": 0.004}

    record = {"planted": {"retrieval": found(0.231, 0.072, 0.324, 0.213),
                          "retrieval_by_method": {"trak": found(0.287, 0.061, 0.403, 0.242)}},
              "by_method": {"tracin": {"pearson_r": 0.42, "permutation_p": 0.3},
                            "trak": {"pearson_r": -0.1, "permutation_p": float("nan")}}}
    folder = tmp_path / "full" / "counterfactual"
    folder.mkdir(parents=True)
    (folder / "counterfactual.json").write_text(json.dumps(record))
    text = "\n".join(seed_notes({0: tmp_path}, [0]))
    assert "which attribution to believe** (50 marked test items; 36 of the 750" in text
    rows = [line for line in text.splitlines() if line.startswith("| TracIn") or line.startswith("| TRAK")]
    assert len(rows) == 2
    assert [c.strip() for c in rows[0].split("|")[1:-1]][:2] == ["TracIn", "+0.42 (p = 0.30)"]
    assert [c.strip() for c in rows[1].split("|")[1:-1]] == ["TRAK's kernel", "-0.10", "0.287", "0.048", "0.061",
                                                             "0.004", "40.3 % / 24.2 %"]
    record["planted"]["retrieval_by_method"], record["by_method"] = {}, {}
    (folder / "counterfactual.json").write_text(json.dumps(record))
    assert "which attribution" not in "\n".join(seed_notes({0: tmp_path}, [0]))  # one method: no table


def test_the_ekfac_benchmark_scores_the_planted_items_beside_the_sketched_methods(planted_study):
    """benchmarks/ekfac_planted.py on the tiny planted study: EK-FAC's scores through kronfluence, and TracIn
    and TRAK over the same items, each with a finite AUPRC against the same chance."""
    import re
    import subprocess
    import sys

    from helpers import REPO, cli_env

    result = subprocess.run([sys.executable, str(REPO / "benchmarks/ekfac_planted.py"), str(planted_study / "full"),
                             "--batch-size", "8", "--m", "6"], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^(EK-FAC \(kronfluence\)|TracIn \(cosine\)|TRAK's kernel) +(\d\.\d+) +(\d\.\d+)", result.stdout, re.M)
    assert [name for name, *_ in rows] == ["EK-FAC (kronfluence)", "TracIn (cosine)", "TRAK's kernel"], result.stdout
    assert len({chance for *_, chance in rows}) == 1 and all(0 < float(ap) <= 1 for _, ap, _ in rows)


def test_the_ekfac_stage_writes_scores_the_ranking_reads_as_any_methods(planted_study):
    """``analyze --stages '[ekfac, influence]' --influence.method ekfac`` on the planted study's full fit: each
    test item's top m is the full argsort of EK-FAC's scores summed over the sketched checkpoints, computed
    here from each checkpoint directly; a second run finds every checkpoint done."""
    import json
    import subprocess
    import sys

    from helpers import cli_env

    from analysis.influence.topk_file import load_topk
    from analysis.sketch_store import read_sketch
    from callbacks.checkpoints import list_checkpoints, load_weights
    from datamodules.base import make_collate
    from lightning_modules.classifier import SequenceClassifier
    from lightning_modules.stages.ekfac import EkfacOptions, ekfac_scores

    full = planted_study / "full"
    command = json.loads((planted_study / ".study" / "natural-influence.json").read_text())["command"]
    command = [a for a in command if not a.startswith("--stages=")] + [
        "--stages=[ekfac, influence]", "--influence.method=ekfac", "--ekfac.batch_size=8", "--ekfac.query_batch_size=6"]
    result = subprocess.run([sys.executable, "-m", "lightning_modules.main", *command], capture_output=True, text=True,
                            env=cli_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    dm = small_pawsx_datamodule(languages=LANGS, train_per_language=30, dev_per_language=8, test_per_language=12,
                                seed=0, plant=PlantOptions("de", 0.5))
    checkpoints = dict(list_checkpoints(full))
    module = SequenceClassifier("tiny-random", languages=LANGS)
    total = 0.0
    for epoch in (0, 1):
        train, test = (read_sketch(full, epoch, "full", split) for split in ("train", "test"))
        load_weights(module, checkpoints[epoch])
        by_index = {s: {e.index: e for e in dm.dataset(s).examples} for s in ("train", "test")}
        scores, _ = ekfac_scores(module, ["model." + n for n in train.meta["layers"]],
                                 [by_index["train"][i] for i in train.indices], [by_index["test"][i] for i in test.indices],
                                 make_collate(dm.tokenizer.pad_token_id), EkfacOptions(batch_size=8, query_batch_size=6))
        total = total + scores
    top = load_topk(full / "influence-ekfac" / "full" / "topk.npz")
    m = top["pos_idx"].shape[1]
    order = np.lexsort((np.tile(np.arange(total.shape[1]), (total.shape[0], 1)), -total), axis=1)[:, :m]
    rows = {int(i): r for r, i in enumerate(test.indices)}
    expected = train.indices[order[[rows[int(i)] for i in top["test_indices"]]]]
    assert (top["pos_idx"] == expected).mean() > 0.95  # the files hold float32: near-ties may swap
    again = subprocess.run([sys.executable, "-m", "lightning_modules.main", *command], capture_output=True, text=True,
                           env=cli_env(), timeout=900)
    assert again.returncode == 0 and again.stdout.count("done already") >= 2, again.stdout[-2000:]
