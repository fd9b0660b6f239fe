"""Drill-down text: which training examples most helped or hurt one test prediction."""

from __future__ import annotations

from pathlib import Path

from analysis.influence import explain


def example_texts(datamodule) -> dict[str, dict[int, str]]:
    """``{"train": {index: text}, "test": {...}}`` of a datamodule (pairs joined with " ||| ")."""
    return {
        split: {e.index: " ||| ".join(e.record.texts) for e in datamodule.dataset(split).examples}
        for split in ("train", "test")
    }


def print_explanation(run_dir: Path, condition: str, test_index: int, texts: dict[str, dict[int, str]]) -> None:
    found = explain(run_dir, condition, test_index, texts)
    verdict = "correct" if found.correct else "wrong"
    print(f"test example {test_index} [{found.test_lang}] label {found.test_label}, predicted {found.test_pred} "
          f"({verdict}), condition {condition} (mask {found.mask}):\n  {found.test_text}\n")
    for title, rows in (("most helpful (positive)", found.positive), ("most harmful (negative)", found.negative)):
        print(f"{title} training examples:")
        for row in rows:
            print(f"  #{row.rank} score {row.score:+.4f}  [{row.lang}] label {row.label}  idx {row.train_index}  {row.id}")
            print(f"      {row.text}")
        print()
