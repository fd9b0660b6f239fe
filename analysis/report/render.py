"""Rendering: the report's Markdown page and its HTML page (a Jinja2 template).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from tabulate import tabulate

from .items import Report


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


MAX_TABLE_ROWS = 80  # a longer table is linked as its CSV, not drawn on the page

_LONG_DECIMAL = re.compile(r"-?\d+\.\d{5,}")


def format_cell(value) -> str:
    """A table cell as shown: floats to 3 significant digits; a number read from a CSV with a long
    tail of decimals (a percentage written at full precision) to 4."""
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.3g}"
    text = str(value)
    return f"{float(text):.4g}" if _LONG_DECIMAL.fullmatch(text) else text


def _cell(value) -> str:
    return format_cell(value).replace("|", "\\|")  # a pipe inside a cell would end it


def markdown_table(rows: list[dict]) -> str:
    """A GitHub pipe table, columns aligned so the Markdown reads as well as its rendering."""
    if not rows:
        return ""
    cols = list(rows[0])
    body = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    return tabulate(body, headers=cols, tablefmt="github", disable_numparse=True)


def render_markdown(rep: Report, header: list[str]) -> str:
    lines = [*header, ""]
    for item in rep.items:
        tag = f" ({item.paper})" if item.paper else ""
        lines += [f"## {item.title}{tag}", "", item.sentence, ""]
        if item.png:
            lines += [f"![{item.title}]({item.png.name})", ""]
        if item.markdown:
            lines += [item.markdown, ""]
        if item.csv:
            lines += [f"Data: [{item.csv.name}]({item.csv.name})", ""]
    if rep.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in rep.notes], ""]
    lines += ["## Missing inputs", ""]
    lines += [f"- {m}" for m in rep.missing] if rep.missing else ["None: every input was present."]
    return "\n".join(lines) + "\n"


def _code(text: str) -> Markup:
    """Escape, and show the Markdown's `backticked` spans as <code>."""
    parts = str(text).split("`")
    return Markup("".join(str(escape(p)) if i % 2 == 0 else f"<code>{escape(p)}</code>" for i, p in enumerate(parts)))


_ENV = Environment(loader=PackageLoader("analysis.report", ""), autoescape=select_autoescape(["html", "j2"]),
                   keep_trailing_newline=True)
_ENV.filters["code"] = _code


def render_html(rep: Report, title: str, header_md: list[str]) -> str:
    """The report as one HTML page (``page.html.j2``): header, contents, every item, notes, missing inputs."""
    items = []
    for item in rep.items:
        rows = read_csv(item.csv) if item.csv and item.csv.suffix == ".csv" and item.png is None else []
        items.append({
            "key": item.key,
            "title": item.title,
            "paper": item.paper,
            "sentence": item.sentence,
            "png": item.png,
            "csv": item.csv,
            "rows": rows if 0 < len(rows) <= MAX_TABLE_ROWS else [],
            "preformatted": item.markdown if item.key == "drilldown" else "",
        })
    # the header's "- what: value" lines as a two-column table (what the run is, how it was analysed)
    header = [tuple(line.removeprefix("- ").split(": ", 1)) if ": " in line else (line.removeprefix("- "), "")
              for line in header_md[1:] if line.strip()]
    return _ENV.get_template("page.html.j2").render(
        title=title, header=header, items=items, notes=rep.notes, missing=rep.missing
    )
