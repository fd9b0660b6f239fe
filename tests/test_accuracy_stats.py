"""Table 2's statistics: majority-class rates, bootstrap intervals of accuracies, paired differences,
the predictions file's checks, and the report's Table 2 built from them."""

from collections import Counter

import numpy as np
import pytest

from analysis.accuracy_stats import (
    Predictions,
    PredictionsError,
    accuracy_table_with_intervals,
    below_majority,
    load_predictions,
    majority_rate,
    paired_accuracy_differences,
)
from analysis.influence import InfluenceOptions
from analysis.report.accuracy_section import accuracy_tables
from analysis.report.items import Report
from analysis.report.render import read_csv

LANGS = ["en", "de", "ko"]


def make_predictions(n=600, seed=0, columns=None) -> Predictions:
    """Random languages and labels; columns default to three models of different skill."""
    rng = np.random.default_rng(seed)
    lang = rng.integers(0, len(LANGS), n)
    label = (rng.random(n) < 0.35).astype(np.int64)  # majority class 0, about 65 %
    if columns is None:
        strong = rng.random(n) < 0.9
        columns = {"full_model": strong, "subnetwork_after_full_ft": strong ^ (rng.random(n) < 0.05),
                   "subnetwork_after_sft": label == 0}
    return Predictions(None, np.arange(n) * 2 + 1, lang, list(LANGS), label, columns)


def half_width(row, column):
    return (row[f"{column}_high"] - row[f"{column}_low"]) / 2


def test_majority_rate_equals_a_counter_reference_per_language():
    rng = np.random.default_rng(7)
    labels = rng.choice([0, 1, 2], size=500, p=[0.2, 0.5, 0.3])
    langs = rng.integers(0, 4, 500)
    langs[langs == 3] = 2  # language 3 left empty
    got = majority_rate(labels, langs, 4)
    for g in range(3):
        counts = Counter(labels[langs == g].tolist())
        assert got[g] == pytest.approx(max(counts.values()) / sum(counts.values()), abs=1e-12)
    assert np.isnan(got[3])


def test_accuracy_interval_half_width_matches_the_binomial_normal_approximation():
    n, p = 4000, 0.3
    rng = np.random.default_rng(11)
    correct = rng.random(n) < p
    preds = Predictions(None, np.arange(n), np.zeros(n, np.int64), ["en"], np.zeros(n, np.int64),
                        {"subnetwork_after_sft": correct})
    row = accuracy_table_with_intervals(preds, n_resamples=2000, seed=3)[0]
    acc = correct.mean()
    expected = 1.96 * np.sqrt(acc * (1 - acc) / n)
    assert half_width(row, "subnetwork_after_sft") == pytest.approx(expected, rel=0.12)
    assert row["subnetwork_after_sft_low"] < acc < row["subnetwork_after_sft_high"]


def test_mean_row_interval_is_the_stratified_one_over_equally_weighted_languages():
    rng = np.random.default_rng(5)
    sizes, rates = [3000, 1000], [0.8, 0.4]
    lang = np.repeat([0, 1], sizes)
    correct = np.concatenate([rng.random(s) < r for s, r in zip(sizes, rates)])
    preds = Predictions(None, np.arange(lang.size), lang, ["en", "de"], np.zeros(lang.size, np.int64),
                        {"full_model": correct})
    rows = accuracy_table_with_intervals(preds, n_resamples=2000, seed=1)
    mean = rows[-1]
    assert mean["language"] == "mean"
    assert mean["full_model"] == pytest.approx((rows[0]["full_model"] + rows[1]["full_model"]) / 2)
    accs = [correct[lang == g].mean() for g in (0, 1)]
    expected = 1.96 * np.sqrt(sum(a * (1 - a) / s for a, s in zip(accs, sizes))) / 2
    assert half_width(mean, "full_model") == pytest.approx(expected, rel=0.12)


def test_paired_differences_are_the_per_example_difference_of_the_columns():
    preds = make_predictions(seed=2)
    diff, lang, languages = paired_accuracy_differences(preds, "subnetwork_after_sft", "full_model")
    expected = preds.correct["subnetwork_after_sft"].astype(float) - preds.correct["full_model"].astype(float)
    np.testing.assert_array_equal(diff, expected)
    np.testing.assert_array_equal(lang, preds.lang)
    assert languages == LANGS and set(np.unique(diff)) <= {-1.0, 0.0, 1.0} and np.any(diff != 0)
    rows = accuracy_table_with_intervals(preds, n_resamples=300)
    for g, row in enumerate(rows[:-1]):
        assert row["diff_subnetwork_after_sft_minus_full_model"] == pytest.approx(diff[lang == g].mean())


def test_paired_interval_is_narrower_than_unpaired_when_columns_are_strongly_correlated():
    rng = np.random.default_rng(9)
    n = 3000
    a = rng.random(n) < 0.6
    b = a ^ (rng.random(n) < 0.04)  # b differs from a on about 4 % of the examples
    preds = Predictions(None, np.arange(n), rng.integers(0, 3, n), list(LANGS), rng.integers(0, 2, n),
                        {"full_model": a, "subnetwork_after_sft": b})
    for row in accuracy_table_with_intervals(preds, n_resamples=1000, seed=4):
        paired = half_width(row, "diff_subnetwork_after_sft_minus_full_model")
        unpaired = np.hypot(half_width(row, "full_model"), half_width(row, "subnetwork_after_sft"))
        assert 0 < paired < 0.5 * unpaired, row["language"]


def test_a_majority_class_predictor_is_flagged_and_a_strong_model_is_not():
    rows = accuracy_table_with_intervals(make_predictions(n=900, seed=3), n_resamples=500)
    for row in rows:
        assert row["full_model_beats_majority"] == "yes"
        assert row["subnetwork_after_sft"] == pytest.approx(row["majority_rate"])
        assert row["subnetwork_after_sft_beats_majority"] == "interval reaches it"
    assert below_majority(rows) == {"subnetwork_after_sft": LANGS}


def test_a_model_worse_than_the_majority_rate_is_a_no():
    preds = make_predictions(n=900, seed=4)
    preds.correct["subnetwork_after_sft"] = preds.label == 1  # always the minority class
    rows = accuracy_table_with_intervals(preds, n_resamples=500)
    assert all(r["subnetwork_after_sft_beats_majority"] == "no" for r in rows)


def test_intervals_are_seeded_by_name_not_by_the_global_rng():
    preds = make_predictions(seed=6)
    np.random.seed(1)
    first = accuracy_table_with_intervals(preds, n_resamples=200, seed=5)
    np.random.seed(2)
    again = accuracy_table_with_intervals(preds, n_resamples=200, seed=5)
    other = accuracy_table_with_intervals(preds, n_resamples=200, seed=6)
    assert first == again
    assert first != other


def save_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def valid_arrays(preds: Predictions) -> dict:
    return {"test_index": preds.test_index, "lang": preds.lang, "languages": np.array(preds.languages, np.str_),
            "label": preds.label, **{f"correct_{k}": v for k, v in preds.correct.items()}}


def test_load_predictions_round_trips_the_arrays(tmp_path):
    preds = make_predictions(n=50, seed=8)
    save_npz(tmp_path / "predictions.npz", **valid_arrays(preds))
    loaded = load_predictions(tmp_path / "predictions.npz")
    assert loaded.languages == LANGS
    np.testing.assert_array_equal(loaded.test_index, preds.test_index)
    for k, v in preds.correct.items():
        np.testing.assert_array_equal(loaded.correct[k], v)


@pytest.mark.parametrize("key", ["test_index", "lang", "languages", "label"])
def test_missing_key_error_names_the_file_and_the_key(tmp_path, key):
    arrays = valid_arrays(make_predictions(n=20))
    del arrays[key]
    path = tmp_path / "predictions.npz"
    save_npz(path, **arrays)
    with pytest.raises(PredictionsError, match=rf"{path}.*missing key '{key}'"):
        load_predictions(path)


def test_file_without_model_columns_or_with_bad_arrays_is_refused_by_name(tmp_path):
    path = tmp_path / "predictions.npz"
    arrays = {k: v for k, v in valid_arrays(make_predictions(n=20)).items() if not k.startswith("correct_")}
    save_npz(path, **arrays)
    with pytest.raises(PredictionsError, match=rf"{path}.*missing key 'correct_<column>'"):
        load_predictions(path)
    save_npz(path, **{**arrays, "correct_full_model": np.ones(19, bool)})
    with pytest.raises(PredictionsError, match=rf"{path}.*'correct_full_model' has shape"):
        load_predictions(path)
    save_npz(path, **{**arrays, "languages": np.array(["en", 1], dtype=object), "correct_full_model": np.ones(20, bool)})
    with pytest.raises(PredictionsError, match=rf"{path}: not a plain-array"):
        load_predictions(path)
    with pytest.raises(PredictionsError, match="not found"):
        load_predictions(tmp_path / "absent.npz")


def write_run(run_dir, preds: Predictions | None):
    acc = run_dir / "accuracy"
    acc.mkdir(parents=True)
    (acc / "accuracy.csv").write_text("language,subnetwork_after_sft\nen,0.6000\nde,0.5000\nko,0.7000\nmean,0.6000\n")
    if preds is not None:
        save_npz(acc / "predictions.npz", **valid_arrays(preds))


def test_report_table2_shows_intervals_and_flags_the_majority_predictor(tmp_path):
    run = tmp_path / "pawsx" / "sft-random"
    write_run(run, make_predictions(n=300, seed=10))
    rep = Report(tmp_path / "report", InfluenceOptions(bootstrap_resamples=200))
    rep.out.mkdir()
    accuracy_tables(rep, [], [run])
    item = next(i for i in rep.items if i.key == "table2_accuracy")
    rows = read_csv(item.csv)
    assert [r["language"] for r in rows] == [*LANGS, "mean"]
    assert {"full_model_low", "full_model_high", "majority_rate", "subnetwork_after_sft_beats_majority",
            "diff_subnetwork_after_sft_minus_full_model_low"} <= set(rows[0])
    assert 50 < float(rows[0]["majority_rate"]) < 80  # in percent
    assert "does not beat the majority-class rate" in item.sentence and "subnetwork after SFT in en" in item.sentence
    assert "†" in item.markdown and "[" in item.markdown


def test_report_table2_without_predictions_copies_accuracy_csv_and_notes_other_runs(tmp_path):
    plain, other = tmp_path / "a" / "sft", tmp_path / "b" / "sft-random"
    write_run(plain, None)
    write_run(other, make_predictions(n=300, seed=12))
    rep = Report(tmp_path / "report", InfluenceOptions(bootstrap_resamples=200))
    rep.out.mkdir()
    accuracy_tables(rep, [], [plain, other])
    item = next(i for i in rep.items if i.key == "table2_accuracy")
    assert item.csv.read_text() == (plain / "accuracy" / "accuracy.csv").read_text()
    assert any("b/sft-random" in n and "does not beat the majority-class rate" in n for n in rep.notes)
