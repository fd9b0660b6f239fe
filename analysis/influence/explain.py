"""``explain``: a test example's most helpful and most harmful training examples, with their text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .options import InfluenceError
from .topk_file import TopKFile, load_topk, topk_path


@dataclass
class InfluentialExample:
    """One training example in a test example's top-m."""

    rank: int
    train_index: int
    lang: str
    label: int
    score: float
    id: str = ""
    text: str | None = None


@dataclass
class Explanation:
    """A test example and its most positively and most negatively influential training examples."""

    condition: str
    test_index: int
    test_lang: str
    test_label: int
    test_pred: int
    correct: bool
    mask: str
    test_text: str | None
    positive: list[InfluentialExample]
    negative: list[InfluentialExample]

    def as_dict(self) -> dict:
        return asdict(self)


def explain(
    run_dir: Path,
    condition: str,
    test_index: int,
    texts_by_index: Mapping[str, Mapping[int, str]] | None = None,
    top: int = 5,
    rankings: TopKFile | None = None,
) -> Explanation:
    """The ``top`` most positive and negative training examples of one test example (by test dataset index).

    Args:
        run_dir: the run directory holding ``influence/<condition>/topk.npz``.
        condition: the condition whose ranking to read.
        test_index: the test example's index in the test split.
        texts_by_index: optional ``{"train": {index: text}, "test": {index: text}}`` from the caller
            (the rankings store ids, not text).
        top: examples per sign.
        rankings: an already loaded ranking (skips reading the file).
    """
    top_file = rankings or load_topk(topk_path(Path(run_dir), condition))
    where = np.flatnonzero(top_file["test_indices"] == int(test_index))
    if where.size == 0:
        raise InfluenceError(
            f"{topk_path(Path(run_dir), condition)}: test index {test_index} was not ranked under {condition!r}"
        )
    row = int(where[0])
    texts = texts_by_index or {}
    train_texts, test_texts = texts.get("train", {}), texts.get("test", {})
    train_pos = {int(i): k for k, i in enumerate(top_file["train_indices"])}

    def rows(sign: str) -> list[InfluentialExample]:
        out = []
        for rank, (i, s) in enumerate(
            zip(top_file[f"{sign}_idx"][row][:top], top_file[f"{sign}_score"][row][:top]), 1
        ):
            k = train_pos[int(i)]
            out.append(
                InfluentialExample(
                    rank,
                    int(i),
                    str(top_file["train_langs"][k]),
                    int(top_file["train_labels"][k]) if "train_labels" in top_file.arrays else -1,
                    float(s),
                    str(top_file["train_ids"][k]) if "train_ids" in top_file.arrays else "",
                    _text(train_texts, int(i)),
                )
            )
        return out

    arr = top_file.arrays
    return Explanation(
        condition,
        int(test_index),
        str(arr["test_langs"][row]),
        int(arr["test_labels"][row]) if "test_labels" in arr else -1,
        int(arr["test_pred"][row]) if "test_pred" in arr else -1,
        bool(arr["test_correct"][row]),
        str(arr["test_masks"][row]) if "test_masks" in arr else "",
        _text(test_texts, int(test_index)),
        rows("pos"),
        rows("neg"),
    )


def _text(texts: Mapping, index: int) -> str | None:
    if index in texts:
        return texts[index]
    return texts.get(str(index))

