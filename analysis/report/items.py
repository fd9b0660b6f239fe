"""What a report is made of: its items (one figure or table each), the rankings it reads (``Source``),
the state sections add to (``Report``), and the helpers every section uses (heatmap items, paper references).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import plots
from ..bootstrap import excludes_zero
from ..contributions import SIGNS, ContributionTable, write_rows_csv
from ..influence import (
    InfluenceError,
    InfluenceOptions,
    TopKFile,
    load_topk,
    run_label,
    topk_path,
)
from ..layout import config_value, read_run_config

SIGN_NAMES = {"pos": "most positive (proponents)", "neg": "most negative (opponents)"}


@dataclass
class Item:
    """One figure or table of the report."""

    key: str
    title: str
    sentence: str
    paper: str = ""
    png: Path | None = None
    csv: Path | None = None
    markdown: str = ""


@dataclass
class Source:
    """The rankings of one condition of one run."""

    run_dir: Path
    label: str
    kind: str
    condition: str
    top: TopKFile

    @property
    def name(self) -> str:
        return f"{self.label}:{self.condition}"


@dataclass
class Report:
    out: Path
    options: InfluenceOptions
    items: list[Item] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    texts: Mapping[str, Mapping] | None = None
    margin: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIGNS, 0.0))

    def marked_note(self) -> str:
        """What a star means in this report's difference heatmaps."""
        if not any(self.margin.values()):
            return "* = 95% CI excludes 0"
        return ("* = 95% CI clears 0 by more than the projection error "
                f"({self.margin['pos']:.1f} pp +, {self.margin['neg']:.1f} pp −)")

    def path(self, key: str, ext: str) -> Path:
        return self.out / f"{key}.{ext}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace("/", "-").replace(":", "__")).strip("_")


def detect_run_kind(run_dir: Path, requested: str = "auto") -> str:
    """``full``, ``sft`` or ``sft-random``: from the option, else from the run's config (SFT runs name their
    subnetworks, shuffled ones a mask seed), else guessed from the run directory's name."""
    if requested != "auto":
        return requested
    config = read_run_config(run_dir)
    if config is not None:
        if config_value(config, "model", "random_mask_seed") is not None:
            return "sft-random"
        return "sft" if config_value(config, "model", "subnetworks") else "full"
    name = Path(run_dir).resolve().name.lower()
    if "sft" in name:
        return "sft-random" if "random" in name else "sft"
    return "full"


def load_sources(
    run_dir: Path,
    conditions: list[str],
    kind: str,
    rep: Report,
    all_present: bool,
    label_taken: str | None = None,
) -> list[Source]:
    """Rankings of the requested conditions (or, with ``all_present``, of every condition found)."""
    label = run_label(run_dir)
    if label == label_taken:
        label = str(Path(run_dir).resolve())
    names = list(conditions)
    if all_present:
        found = sorted(p.parent.name for p in (run_dir / "influence").glob("*/topk.npz"))
        names = [c for c in names if c in found] + [c for c in found if c not in names]
    out = []
    for condition in names:
        path = topk_path(run_dir, condition)
        if not path.is_file():
            rep.missing.append(f"{path} (condition {condition!r} of {label}: run the influence stage)")
            continue
        try:
            out.append(Source(run_dir, label, kind, condition, load_topk(path)))
        except InfluenceError as err:
            rep.missing.append(f"{path}: unreadable ({err})")
    return out


def table_rows(table: ContributionTable, extra: dict, margin: dict[str, float] | None = None) -> list[dict]:
    """The table's CSV rows; with ``margin`` (a difference table) each row says whether it is marked."""
    rows = [{**extra, **row} for row in table.rows()]
    if margin is not None:
        for row in rows:
            row["marked"] = bool(excludes_zero(row["ci_low"], row["ci_high"], margin[row["sign"]]))
    return rows


TABLE_COLUMNS = ["test_lang", "train_lang", "sign", "percent", "ci_low", "ci_high", "n_test"]


def heatmap_item(
    rep: Report,
    key: str,
    title: str,
    sentence: str,
    paper: str,
    table: ContributionTable,
    diverging: bool,
    extra: dict,
) -> Item:
    panels = [
        plots.Panel(
            f"{SIGN_NAMES[s]}" + (" — change (pp)" if diverging else " — %"),
            table.percent[s],
            table.languages,
            table.languages,
            table.ci_low[s],
            table.ci_high[s],
            diverging=diverging,
            margin=rep.margin[s] if diverging else 0.0,
        )
        for s in SIGNS
    ]
    counts = ", ".join(f"{lang} {int(n)}" for lang, n in zip(table.languages, table.n_test))
    note = f"test examples per language: {counts}" + (f"; {rep.marked_note()}" if diverging else "")
    png = plots.plot_heatmaps(rep.path(key, "png"), panels, title, note)
    rows = table_rows(table, extra, rep.margin if diverging else None)
    columns = [*extra, *TABLE_COLUMNS] + (["marked"] if diverging else [])
    csv_path = write_rows_csv(rep.path(key, "csv"), rows, columns)
    return Item(key, title, sentence + f" Test examples kept per language: {counts}.", paper, png, csv_path)


def paper_abs(kind: str, condition: str) -> str:
    if condition == "full" and kind == "full":
        return "Fig 11"
    if condition == "own" and kind in ("sft", "sft-random"):
        return "Fig 5" if kind == "sft" else "Fig 5 (random SFT)"
    return ""


def paper_diff(kind: str, condition: str, cross_run: bool) -> str:
    pair = condition.startswith(("union-", "intersect-"))
    if not cross_run:
        if kind == "full" and condition == "own":
            return "Fig 2"
        if kind == "full" and (condition.startswith("random") or condition.startswith("as-")):
            return "Fig 3 (all test languages)"
        return "Fig 19 (composed masks)" if pair else ""
    if kind == "sft" and condition == "own":
        return "Fig 4"
    if kind == "sft-random" and (condition == "own" or condition.startswith("random")):
        return "Fig 6"
    return "Fig 19" if pair else ""

