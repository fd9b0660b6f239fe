"""The study's findings sentences read the numbers the report tables hold, in-language cells only."""

from __future__ import annotations

import csv
import json

from analysis.study.findings import study_findings


def write_diff(root, run, title, name, cells):
    report = root / run / "report"
    report.mkdir(parents=True, exist_ok=True)
    with open(report / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "condition", "reference", "test_lang", "train_lang", "sign", "percent", "ci_low", "ci_high", "n_test"])
        for (test, train, sign), (pct, lo, hi) in cells.items():
            w.writerow([run, "own", "x", test, train, sign, pct, lo, hi, 30])
    items = report / "items.json"
    old = json.loads(items.read_text()) if items.is_file() else []
    items.write_text(json.dumps([*old, {"title": title, "csv": name, "key": name, "paper": "", "png": None}]))


def test_findings_quote_in_language_changes_with_their_intervals(tmp_path):
    write_diff(tmp_path, "full", "full:own − full:full: change in % of top-50", "d1.csv", {
        ("de", "de", "pos"): (4.0, 1.5, 6.5),
        ("de", "en", "pos"): (-9.0, -12.0, -6.0),   # a cross-language cell: not quoted
        ("en", "en", "pos"): (-1.0, -3.0, 1.0),
        ("en", "en", "neg"): (7.0, 5.0, 9.0),       # negative influence: not quoted
    })
    (tmp_path / "sft" / "accuracy").mkdir(parents=True)
    (tmp_path / "sft" / "accuracy" / "accuracy.csv").write_text(
        "language,full_model,subnetwork_after_full_ft,subnetwork_after_sft\nde,0.7000,0.6500,0.7250\n")
    found = study_findings(tmp_path)
    assert len(found) == 2
    assert "(paper Fig 2)" in found[0] and "+1.5 pp on average" in found[0]
    assert "de +4.0 [+1.5, +6.5]" in found[0] and "en -1.0 [-3.0, +1.0]" in found[0]
    assert "marked (the interval clears zero by more than the projection error) for de" in found[0]
    assert "-9.0" not in found[0] and "+7.0" not in found[0]
    assert "de 0.700 → 0.725" in found[1]


def test_findings_follow_the_reports_marking_when_the_csv_has_it(tmp_path):
    """A change whose interval excludes zero but not the projection error is not called a finding."""
    report = tmp_path / "full" / "report"
    report.mkdir(parents=True)
    (report / "d.csv").write_text(
        "test_lang,train_lang,sign,percent,ci_low,ci_high,n_test,marked\n"
        "de,de,pos,2.0,0.5,3.5,30,False\n"
        "fr,fr,pos,6.0,4.0,8.0,30,True\n"
    )
    (report / "items.json").write_text(json.dumps([{"title": "full:own − full:full: change in % of top-50", "csv": "d.csv"}]))
    (found,) = study_findings(tmp_path)
    assert found.endswith("for fr.") and "de +2.0 [+0.5, +3.5]" in found


def test_accuracy_sentence_states_intervals_and_a_run_below_the_majority_rate_is_named(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    n = 120
    lang = np.repeat([0, 1], n // 2)
    label = (rng.random(n) < 0.3).astype(np.int64)  # majority class 0 at about .7
    full = rng.random(n) < 0.8
    sft = np.zeros(n, dtype=bool) | (label == 0)  # the SFT model always predicts the majority class
    (tmp_path / "sft" / "accuracy").mkdir(parents=True)
    np.savez(tmp_path / "sft" / "accuracy" / "predictions.npz", test_index=np.arange(n), lang=lang,
             languages=np.array(["de", "en"]), label=label, correct_full_model=full,
             correct_subnetwork_after_full_ft=full, correct_subnetwork_after_sft=sft)
    write_diff(tmp_path, "sft", "sft:own − full:full: change in % of top-50", "d.csv",
               {("de", "de", "pos"): (3.0, 1.0, 5.0), ("en", "en", "pos"): (1.0, -1.0, 3.0)})
    change, accuracy = study_findings(tmp_path)
    de = lang == 0
    assert f"de {full[de].mean():.3f} [" in accuracy and f"→ {sft[de].mean():.3f} [" in accuracy
    diff = 100 * (sft[de].mean() - full[de].mean())
    assert f"{diff:+.1f} points [" in accuracy and f"(majority {1 - label[de].mean():.3f})" in accuracy
    assert "the `sft` model does not beat the majority-class rate on test: every language" in change
