"""The accuracy tables: Table 2 from an SFT run's ``accuracy/accuracy.csv`` (or, without it, the
accuracy of the ranked test examples from the sketches).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..contributions import write_rows_csv
from .items import Item, Report, Source
from .render import markdown_table, read_csv


def accuracy_tables(rep: Report, sources: list[Source], run_dirs: list[Path]) -> None:
    for d in run_dirs:
        path = d / "accuracy" / "accuracy.csv"
        if path.is_file():
            rows = read_csv(path)
            dest = rep.path("table2_accuracy", "csv")
            shutil.copyfile(path, dest)
            rep.items.append(
                Item(
                    "table2_accuracy",
                    "Accuracy: full fine-tuning vs SFT",
                    f"Test accuracy per language of the full model, of each subnetwork after full fine-tuning and "
                    f"after SFT (from {path}).",
                    "Table 2",
                    None,
                    dest,
                    markdown_table(rows),
                )
            )
            break
    else:
        rep.missing.append("accuracy/accuracy.csv (Table 2; accuracies from the sketches are shown instead)")
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

