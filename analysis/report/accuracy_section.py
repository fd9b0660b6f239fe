"""The accuracy tables: Table 2 from an SFT run's ``accuracy/accuracy.csv`` (or, without it, the
accuracy of the ranked test examples from the sketches). With ``accuracy/predictions.npz`` beside it,
Table 2 gets bootstrap intervals, the majority-class rate and paired differences, and every run whose
per-example results are known is checked against the majority-class rate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import accuracy_stats as stats
from ..contributions import write_rows_csv
from ..influence import run_label
from .items import Item, Report, Source
from .render import markdown_table, read_csv

SHORT = {"full_model": "full model", "subnetwork_after_full_ft": "subnetwork after full FT",
         "subnetwork_after_sft": "subnetwork after SFT"}


def accuracy_tables(rep: Report, sources: list[Source], run_dirs: list[Path]) -> None:
    """Table 2 from the first run with an accuracy.csv; a majority-class sentence for every run with
    per-example results; and the accuracy of the ranked test examples from the sketches."""
    tables = {d: interval_rows(rep, d) for d in run_dirs}
    shown = None
    for d in run_dirs:
        path = d / "accuracy" / "accuracy.csv"
        if path.is_file():
            rep.items.append(table2_with_intervals(rep, d, tables[d]) if tables[d] else table2_plain(rep, path))
            shown = d
            break
    else:
        rep.missing.append("accuracy/accuracy.csv (Table 2; accuracies from the sketches are shown instead)")
    for d, rows in tables.items():
        if rows and d != shown:  # the shown table's run has the sentence in its item
            rep.notes.append(majority_sentence(d, rows))
    sketch_accuracy(rep, sources)


def interval_rows(rep: Report, run_dir: Path) -> list[dict] | None:
    """Table 2 rows with intervals from ``<run>/accuracy/predictions.npz``; None (and a note when the file
    is there but unusable) without it, so the report falls back to the plain means."""
    path = run_dir / "accuracy" / "predictions.npz"
    if not path.is_file():
        return None
    try:
        predictions = stats.load_predictions(path)
    except stats.PredictionsError as err:
        rep.notes.append(f"{err}: Table 2 shown without intervals")
        return None
    return stats.accuracy_table_with_intervals(predictions, rep.options.bootstrap_resamples, rep.options.seed,
                                               rep.options.ci_level)


def table2_plain(rep: Report, path: Path) -> Item:
    """Table 2 as the SFT run wrote it (means only; no predictions.npz beside it)."""
    dest = rep.path("table2_accuracy", "csv")
    shutil.copyfile(path, dest)
    return Item(
        "table2_accuracy",
        "Accuracy: full fine-tuning vs SFT",
        f"Test accuracy per language of the full model, of each subnetwork after full fine-tuning and "
        f"after SFT (from {path}).",
        "Table 2",
        None,
        dest,
        markdown_table(read_csv(path)),
    )


def table2_with_intervals(rep: Report, run_dir: Path, rows: list[dict]) -> Item:
    """Table 2 with bootstrap intervals, the majority-class rate and the paired differences; its CSV in %."""
    percent = [to_percent(r) for r in rows]
    columns = list(percent[0])
    dest = write_rows_csv(rep.path("table2_accuracy", "csv"), percent, columns)
    level = int(rep.options.ci_level * 100)
    sentence = (
        f"Test accuracy (%) per language of the full model, of each subnetwork after full fine-tuning and after "
        f"SFT, with {level}% percentile bootstrap intervals over the test examples ({rep.options.bootstrap_resamples} "
        f"resamples, stratified by language for the mean row); differences (pp) are paired over the same examples; "
        f"† = the interval's lower end does not clear the majority-class rate (from {run_dir / 'accuracy'}). "
        + majority_sentence(run_dir, rows)
    )
    return Item("table2_accuracy", "Accuracy: full fine-tuning vs SFT", sentence, "Table 2", None, dest,
                markdown_table([display_row(r) for r in percent]))


def to_percent(row: dict) -> dict:
    """Accuracies, rates and differences ×100; counts and verdicts unchanged."""
    return {k: 100.0 * v if isinstance(v, float) else v for k, v in row.items()}


def display_row(row: dict) -> dict:
    """One Markdown row: ``accuracy [low, high]`` per column, † where it does not beat the majority rate."""
    out = {"language": row["language"], "n_test": row["n_test"], "majority (%)": f"{row['majority_rate']:.1f}"}
    for c in [k for k in row if f"{k}_beats_majority" in row]:
        mark = "" if row[f"{c}_beats_majority"] == "yes" else " †"
        out[SHORT.get(c, c)] = f"{row[c]:.1f} [{row[f'{c}_low']:.1f}, {row[f'{c}_high']:.1f}]{mark}"
    for a, b in stats.DIFFERENCES:
        name = stats.difference_name(a, b)
        if name in row:
            out[f"{SHORT.get(a, a)} − {SHORT.get(b, b)} (pp)"] = (
                f"{row[name]:+.1f} [{row[f'{name}_low']:+.1f}, {row[f'{name}_high']:+.1f}]")
    return out


def majority_sentence(run_dir: Path, rows: list[dict]) -> str:
    """Says which columns fail to beat the majority-class rate, so a model predicting one class
    everywhere (the random-subnetwork SFT model, today) does not pass for a weak but working one."""
    failing = stats.below_majority(rows)
    where = f"{run_label(run_dir)} ({run_dir})"
    if not failing:
        return f"Majority-class check, {where}: every column beats the majority-class rate in every language."
    by_lang = {r["language"]: r for r in rows}
    parts = []
    for column, langs in failing.items():
        cells = ", ".join(f"{lang} {100 * by_lang[lang][column]:.1f} vs {100 * by_lang[lang]['majority_rate']:.1f}"
                          for lang in langs)
        parts.append(f"{SHORT.get(column, column)} in {cells}")
    return (f"Majority-class check, {where}: does not beat the majority-class rate (accuracy vs majority, %; "
            f"the interval's lower end does not clear it): {'; '.join(parts)}.")


def sketch_accuracy(rep: Report, sources: list[Source]) -> None:
    """Accuracy of the ranked test examples from the sketches' ``correct`` flags."""
    rows = []
    for src in sources:
        codes = src.top.test_codes()
        correct = src.top["test_correct"]
        for i, lang in enumerate(src.top.languages):
            sel = codes == i
            if sel.any():
                rows.append(
                    {
                        "run": src.label,
                        "condition": src.condition,
                        "test_lang": lang,
                        "accuracy": 100.0 * correct[sel].mean(),
                        "n_test": int(sel.sum()),
                        "epoch": src.top.epochs[-1],
                    }
                )
    if rows:
        csv_path = write_rows_csv(rep.path("accuracy_from_sketches", "csv"), rows, list(rows[0]))
        wide = pivot(rows)
        rep.items.append(
            Item(
                "accuracy_from_sketches",
                "Accuracy per condition (final checkpoint)",
                "Test accuracy per test language of every ranked condition at the last checkpoint, from the "
                "sketches' `correct` flags (the examples that enter the influence filter).",
                "Table 2 (companion)",
                None,
                csv_path,
                markdown_table(wide),
            )
        )


def pivot(rows: list[dict]) -> list[dict]:
    langs = list(dict.fromkeys(r["test_lang"] for r in rows))
    cols = list(dict.fromkeys(f"{r['run']}:{r['condition']}" for r in rows))
    table = {lang: {"test_lang": lang} for lang in langs}
    for r in rows:
        table[r["test_lang"]][f"{r['run']}:{r['condition']}"] = f"{r['accuracy']:.1f}"
    return [{k: table[lang].get(k, "") for k in ["test_lang", *cols]} for lang in langs]

