"""What one training run of a study found, in sentences a reader can check against the paper: the
in-language share of each test language's most positive influences under its own subnetwork vs the
full model (paper Fig 2), after SFT vs the fully fine-tuned model (Fig 4), after SFT with shuffled
subnetworks (Fig 6), and accuracy after SFT vs full fine-tuning with paired intervals (Table 2); beside
each, a degenerate subnetwork or a model that did not beat the majority class. Reads only the files
the stages wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..accuracy_stats import (
    PredictionsError,
    accuracy_table_with_intervals,
    difference_name,
    load_predictions,
)
from ..layout import sft_random_runs
from .pooled import qualifying_notes

# (run, condition, reference run, reference condition, what it answers, paper item)
QUESTIONS = [
    ("full", "own", "full", "full", "after full fine-tuning, own subnetwork vs the full model", "Fig 2"),
    ("sft", "own", "full", "full", "after SFT (own subnetworks) vs the fully fine-tuned model", "Fig 4"),
    ("sft", "own", "full", "own", "after SFT vs full fine-tuning, both under the own subnetworks", ""),
]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def find_difference_csv(root: Path, run: str, condition: str, ref_run: str, ref_condition: str) -> Path | None:
    """The report table of ``run:condition − ref_run:ref_condition`` (None when the study lacks it)."""
    items = root / run / "report" / "items.json"
    if not items.is_file():
        return None
    def names(label: str, wanted: str) -> bool:  # labels are "<run>" or "<study>/<run>"
        return label == wanted or label.endswith("/" + wanted)

    for item in json.loads(items.read_text()):
        title = item.get("title", "")
        if " − " not in title or ": change" not in title or not item.get("csv"):
            continue
        left, rest = title.split(" − ", 1)
        right = rest.split(": change", 1)[0]
        if names(left, f"{run}:{condition}") and names(right, f"{ref_run}:{ref_condition}"):
            return root / run / "report" / item["csv"]
    return None


def in_language_changes(path: Path, sign: str = "pos") -> list[tuple[str, float, float, float, bool]]:
    """(language, change in pp, CI low, CI high, marked) of each test language's in-language share;
    ``marked`` is the report's verdict (the CI clears zero by more than the projection error)."""
    out = []
    for row in _rows(path):
        if row["sign"] == sign and row["test_lang"] == row["train_lang"]:
            low, high = float(row["ci_low"]), float(row["ci_high"])
            marked = row["marked"] == "True" if "marked" in row else (low > 0 or high < 0)
            out.append((row["test_lang"], float(row["percent"]), low, high, marked))
    return out


def describe_changes(changes: list[tuple[str, float, float, float, bool]]) -> str:
    mean = sum(c[1] for c in changes) / len(changes)
    marked = [lang for lang, *_, mark in changes if mark]
    cells = "; ".join(f"{lang} {c:+.1f} [{lo:+.1f}, {hi:+.1f}]" for lang, c, lo, hi, _ in changes)
    return (f"{mean:+.1f} pp on average over test languages ({cells}; 95% paired-bootstrap CIs); "
            + (f"marked (the interval clears zero by more than the projection error) for {', '.join(marked)}"
               if marked else "none marked (no interval clears zero by more than the projection error)"))


def accuracy_sentence(root: Path) -> str | None:
    """Table 2 in a sentence: with per-example predictions, each language's accuracies with 95 % intervals
    and the paired difference SFT − full; otherwise the means of accuracy.csv."""
    try:
        pred = load_predictions(root / "sft" / "accuracy" / "predictions.npz")
    except (PredictionsError, OSError):
        pred = None
    if pred is not None and {"full_model", "subnetwork_after_sft"} <= set(pred.correct):
        diff = difference_name("subnetwork_after_sft", "full_model")
        cells = "; ".join(
            f"{r['language']} {r['full_model']:.3f} [{r['full_model_low']:.3f}, {r['full_model_high']:.3f}] → "
            f"{r['subnetwork_after_sft']:.3f} [{r['subnetwork_after_sft_low']:.3f}, "
            f"{r['subnetwork_after_sft_high']:.3f}], {100 * r[diff]:+.1f} points [{100 * r[diff + '_low']:+.1f}, "
            f"{100 * r[diff + '_high']:+.1f}] (majority {r['majority_rate']:.3f})"
            for r in accuracy_table_with_intervals(pred)
        )
        return (f"Test accuracy, full fine-tuning → SFT with the subnetworks (Table 2; 95% bootstrap intervals, the "
                f"difference paired over the same {len(pred.lang)} test examples): {cells}.")
    path = root / "sft" / "accuracy" / "accuracy.csv"
    if not path.is_file():
        return None
    rows = _rows(path)
    cols = list(rows[0]) if rows else []
    full_col = next((c for c in cols if c.startswith("full")), None)
    sft_col = next((c for c in cols if "after_sft" in c or c.startswith("sft")), None)
    lang_col = cols[0] if cols else None
    if not (full_col and sft_col and lang_col):
        return None
    cells = "; ".join(f"{r[lang_col]} {float(r[full_col]):.3f} → {float(r[sft_col]):.3f}" for r in rows)
    return f"Test accuracy, full fine-tuning → SFT with the subnetworks (Table 2): {cells}."


def questions(root: Path) -> list[tuple[str, str, str, str, str, str]]:
    """QUESTIONS plus, for each random-subnetwork SFT run, its in-language share vs the full model (Fig 6)."""
    return QUESTIONS + [(run.name, f"random{seed}", "full", "full",
                         f"after SFT with shuffled subnetworks ({run.name}) vs the fully fine-tuned model", "Fig 6")
                        for seed, run in sft_random_runs(Path(root)).items()]


def study_findings(root: Path) -> list[str]:
    """One sentence per question the study's files can answer, with what qualifies it."""
    root = Path(root)
    out = []
    for run, cond, ref_run, ref_cond, what, paper in questions(root):
        path = find_difference_csv(root, run, cond, ref_run, ref_cond)
        if path is None or not path.is_file():
            continue
        changes = in_language_changes(path)
        if changes:
            tag = f" (paper {paper})" if paper else ""
            notes = qualifying_notes({0: root}, [run], True)
            beware = ("; beware: " + "; ".join(n.replace("seed 0 ", "") for n in notes)) if notes else ""
            out.append(f"In-language share of the top positive influences, {what}{tag}: {describe_changes(changes)}"
                       f"{beware}.")
    if sentence := accuracy_sentence(root):
        out.append(sentence)
    return out
