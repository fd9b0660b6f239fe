"""What a study found, in sentences a reader can check against the paper: the in-language share
of each test language's most positive influences under its own subnetwork vs the full model
(paper Fig 2), after SFT vs the fully fine-tuned model (Fig 4), and accuracy after SFT vs full
fine-tuning (Table 2). Reads only the CSV files the stages wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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


def study_findings(root: Path) -> list[str]:
    """One sentence per question the study's files can answer."""
    root = Path(root)
    out = []
    for run, cond, ref_run, ref_cond, what, paper in QUESTIONS:
        path = find_difference_csv(root, run, cond, ref_run, ref_cond)
        if path is None or not path.is_file():
            continue
        changes = in_language_changes(path)
        if changes:
            tag = f" (paper {paper})" if paper else ""
            out.append(f"In-language share of the top positive influences, {what}{tag}: {describe_changes(changes)}.")
    if sentence := accuracy_sentence(root):
        out.append(sentence)
    return out
