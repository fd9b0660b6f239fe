"""The drill-down: a few test examples per language with their most helpful and harmful training examples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..contributions import write_rows_csv
from ..influence import (
    TopKFile,
    explain,
    kept_indices,
)
from .items import Item, Report, Source


def drilldown(rep: Report, sources: list[Source], run_dir: Path) -> None:
    own = [s for s in sources if s.run_dir == run_dir]
    if not own or rep.options.explain_per_language < 1:
        return
    src = next((s for s in own if s.condition == "own"), own[0])
    texts = load_texts(rep)
    kept = set(kept_indices([src.top]).tolist())
    codes = src.top.test_codes()
    lines, rows = [], []
    for li, lang in enumerate(src.top.languages):
        idx = [int(i) for i in src.top["test_indices"][codes == li] if int(i) in kept][
            : rep.options.explain_per_language
        ]
        for test_index in idx:
            ex = explain(run_dir, src.condition, test_index, texts, rep.options.explain_top, rankings=src.top)
            head = f"- **{lang} test #{ex.test_index}** (label {ex.test_label}, mask `{ex.mask}`)"
            lines.append(
                head
                + (f": {short(ex.test_text)}" if ex.test_text else f" id `{test_id(src.top, test_index)}`")
            )
            for sign, items in (("+", ex.positive), ("−", ex.negative)):
                for it in items:
                    body = short(it.text) if it.text else f"id `{it.id}`"
                    lines.append(
                        f"    - {sign}{it.rank}: [{it.lang}, label {it.label}, score {it.score:.3f}] {body}"
                    )
                    rows.append(
                        {
                            "test_index": test_index,
                            "test_lang": lang,
                            "sign": "pos" if sign == "+" else "neg",
                            "rank": it.rank,
                            "train_index": it.train_index,
                            "train_lang": it.lang,
                            "label": it.label,
                            "score": it.score,
                            "id": it.id,
                            "text": it.text or "",
                        }
                    )
    if rows:
        csv_path = write_rows_csv(rep.path("drilldown", "csv"), rows, list(rows[0]))
        sentence = (
            f"For a few correctly classified test examples per language (`{src.name}`), their most positively (+) "
            "and most negatively (−) influential training examples with language, label and summed score"
            + ("." if texts else "; pass `texts` to show text instead of ids.")
        )
        rep.items.append(
            Item(
                "drilldown",
                "Drill-down: influential training examples",
                sentence,
                "",
                None,
                csv_path,
                "\n".join(lines),
            )
        )


def test_id(top: TopKFile, test_index: int) -> str:
    if "test_ids" not in top.arrays:
        return ""
    return str(top["test_ids"][np.flatnonzero(top["test_indices"] == test_index)[0]])


def load_texts(rep: Report) -> Mapping | None:
    if rep.texts is not None:
        return rep.texts
    if not rep.options.texts:
        return None
    path = Path(rep.options.texts)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        rep.missing.append(f"{path}: texts unreadable ({err})")
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("train", "test")):
        rep.missing.append(f"{path}: expected {{'train': {{index: text}}, 'test': {{index: text}}}}")
        return None
    return data


def short(text: str | None, n: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"

