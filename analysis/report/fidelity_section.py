"""The fidelity table: sketched rankings against rankings from exact gradients of a reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contributions import write_rows_csv
from ..influence import (
    compare_rankings,
    load_topk,
    run_label,
    topk_path,
)
from .items import Item, Report, Source
from .render import markdown_table


def fidelity(rep: Report, sources: list[Source], run_dir: Path) -> None:
    if not rep.options.exact_run:
        return
    exact_dir = Path(rep.options.exact_run)
    rows = []
    for src in sources:
        if src.run_dir != run_dir:
            continue
        path = topk_path(exact_dir, src.condition)
        if not path.is_file():
            rep.missing.append(f"{path} (exact rankings for the fidelity table)")
            continue
        fid = compare_rankings(src.top, load_topk(path))
        rows.append(
            {
                "condition": src.condition,
                "projection": json.dumps(src.top.meta.get("projection")),
                "d": src.top.meta.get("d"),
                **fid.as_dict(),
            }
        )
    if rows:
        csv_path = write_rows_csv(rep.path("fidelity", "csv"), rows, list(rows[0]))
        rep.items.append(
            Item(
                "fidelity",
                "Fidelity of sketched rankings",
                f"Sketched rankings of `{run_label(run_dir)}` against rankings from exact gradients in "
                f"`{exact_dir}`: recall@m of the top-m sets, Spearman of scores, largest change of a "
                "contribution cell (pp).",
                "",
                None,
                csv_path,
                markdown_table(rows),
            )
        )

