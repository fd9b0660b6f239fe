"""The report: every figure and table of the paper's list that the run's stages made possible.

``write_report`` reads ``influence/<condition>/topk.npz`` of a run (and of a run it is compared with),
``subnetworks/<lang>.json`` masks, ``subnetworks/stats/table1_disabled_heads.csv`` and
``accuracy/accuracy.csv`` when present, and writes ``<run>/report/``: one PNG and one CSV per figure or
table, ``report.md`` and ``report.html`` with one sentence each on what is compared. Inputs that do
not exist are listed under "Missing inputs" instead of failing the report.

Conventions: rows are test languages, columns training languages, in the run's language order;
only test examples that every compared model classifies correctly enter a comparison (the count per
language is in every CSV, column ``n_test``); differences are paired over the same test examples;
every percentage carries a bootstrap CI over test examples, and a difference is starred in the
heatmaps (and ``marked`` in its CSV) when its CI clears zero by more than the projection's share
error measured by the run's ``fidelity`` stage (``projection_error``; zero when not measured, which
the report says).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots
from .atomic import write_text_atomic as _write_text
from .bootstrap import excludes_zero
from .contributions import SIGNS, ContributionTable, write_rows_csv
from .correlations import (
    SpecialisationPoint,
    cross_language_points,
    head_usage,
    mask_cosine,
    overlap_count,
    overlap_percent,
    pair_matrix,
    per_layer_correlations,
    specialisation_vs_accuracy,
)
from .influence_stage import (
    InfluenceError,
    InfluenceOptions,
    TopKFile,
    check_same_test_split,
    compare_rankings,
    condition_table,
    difference_table,
    explain,
    kept_indices,
    load_topk,
    run_label,
    topk_path,
)
from .masks import MaskError, condition_masks, load_subnetworks, resolve_mask
from .projection_error import ProjectionError, load_projection_error, marking_margin

log = logging.getLogger(__name__)

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
class _Report:
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text.replace("/", "-").replace(":", "__")).strip("_")


def detect_run_kind(run_dir: Path, requested: str = "auto") -> str:
    """``full``, ``sft`` or ``sft-random``: from the option, else guessed from the run directory's name."""
    if requested != "auto":
        return requested
    name = Path(run_dir).resolve().name.lower()
    if "sft" in name:
        return "sft-random" if "random" in name else "sft"
    return "full"


def _load_sources(
    run_dir: Path,
    conditions: list[str],
    kind: str,
    rep: _Report,
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


def _table_rows(table: ContributionTable, extra: dict, margin: dict[str, float] | None = None) -> list[dict]:
    """The table's CSV rows; with ``margin`` (a difference table) each row says whether it is marked."""
    rows = [{**extra, **row} for row in table.rows()]
    if margin is not None:
        for row in rows:
            row["marked"] = bool(excludes_zero(row["ci_low"], row["ci_high"], margin[row["sign"]]))
    return rows


_TABLE_COLUMNS = ["test_lang", "train_lang", "sign", "percent", "ci_low", "ci_high", "n_test"]


def _heatmap_item(
    rep: _Report,
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
    rows = _table_rows(table, extra, rep.margin if diverging else None)
    columns = [*extra, *_TABLE_COLUMNS] + (["marked"] if diverging else [])
    csv_path = write_rows_csv(rep.path(key, "csv"), rows, columns)
    return Item(key, title, sentence + f" Test examples kept per language: {counts}.", paper, png, csv_path)


def _paper_abs(kind: str, condition: str) -> str:
    if condition == "full" and kind == "full":
        return "Fig 11"
    if condition == "own" and kind in ("sft", "sft-random"):
        return "Fig 5" if kind == "sft" else "Fig 5 (random SFT)"
    return ""


def _paper_diff(kind: str, condition: str, cross_run: bool) -> str:
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


# ------------------------------------------------------------------------------------------ sections


def _absolute(rep: _Report, sources: list[Source]) -> None:
    for src in sources:
        kept = kept_indices([src.top])
        table = condition_table(src.top, kept, rep.options, src.condition)
        key = _slug(f"contrib_{src.label}_{src.condition}")
        title = f"{src.name}: % of top-{src.top.meta['m']} from each training language"
        sentence = (
            f"Share of each training language among the top-{src.top.meta['m']} most positive and most negative "
            f"training examples of each test language's examples, for condition `{src.condition}` of run `{src.label}` "
            "(test examples this model classifies correctly)."
        )
        rep.items.append(
            _heatmap_item(
                rep,
                key,
                title,
                sentence,
                _paper_abs(src.kind, src.condition),
                table,
                False,
                {"run": src.label, "condition": src.condition},
            )
        )


def _differences(rep: _Report, sources: list[Source]) -> dict[tuple[str, str], ContributionTable]:
    """Within-run (condition − full) and cross-run (condition − other run's full) differences."""
    by_run: dict[str, dict[str, Source]] = {}
    for src in sources:
        by_run.setdefault(src.label, {})[src.condition] = src
    pairs: list[tuple[Source, Source, bool]] = []
    for conds in by_run.values():
        if "full" in conds:
            pairs += [(s, conds["full"], False) for c, s in conds.items() if c != "full"]
    runs = list(by_run)
    if len(runs) == 2:
        a, b = (by_run[r] for r in runs)
        kind_a = next(iter(a.values())).kind
        kind_b = next(iter(b.values())).kind
        if "full" in b and (kind_b == "full" or kind_a != "full"):
            pairs += [
                (s, b["full"], True) for s in a.values() if not (kind_a == kind_b and s.condition == "full")
            ]
        elif "full" in a and kind_a == "full" and kind_b != "full":
            pairs += [(s, a["full"], True) for s in b.values()]
    out = {}
    for src, ref, cross in pairs:
        try:
            check_same_test_split(src.top, ref.top, src.name, ref.name)
            table = difference_table(
                src.top,
                ref.top,
                kept_indices([src.top, ref.top]),
                rep.options,
                f"{src.condition}-{ref.condition}",
            )
        except (InfluenceError, ValueError) as err:
            rep.notes.append(f"skipped {src.name} − {ref.name}: {err}")
            continue
        out[(src.name, ref.name)] = table
        key = _slug(f"diff_{src.label}_{src.condition}_minus_{ref.label}_{ref.condition}")
        title = f"{src.name} − {ref.name}: change in % of top-{src.top.meta['m']}"
        sentence = (
            f"Change (percentage points) in each training language's share of the top-{src.top.meta['m']} when "
            f"`{src.condition}` of `{src.label}` replaces `{ref.condition}` of `{ref.label}`, paired over test "
            "examples both classify correctly; * marks a paired-bootstrap 95% CI that clears zero by more than the "
            "projection error (header)."
        )
        rep.items.append(
            _heatmap_item(
                rep,
                key,
                title,
                sentence,
                _paper_diff(src.kind, src.condition, cross),
                table,
                True,
                {"run": src.label, "condition": src.condition, "reference": ref.name},
            )
        )
    return out


def _focus_language(
    rep: _Report, sources: list[Source], diffs: dict[tuple[str, str], ContributionTable]
) -> None:
    """Paper Fig 3: one test language, random and suboptimal masks vs the full model (same run)."""
    lang = rep.options.focus_language
    for label in dict.fromkeys(s.label for s in sources):
        rows = [(s, diffs.get((s.name, f"{label}:full"))) for s in sources if s.label == label]
        rows = [
            (s, t)
            for s, t in rows
            if t is not None
            and lang in t.languages
            and (s.condition == "own" or s.condition.startswith(("random", "as-")))
        ]
        if len(rows) < 2:
            continue
        i = rows[0][1].languages.index(lang)
        languages = rows[0][1].languages
        names = [s.condition for s, _ in rows]
        panels, csv_rows = [], []
        for sign in SIGNS:
            mat = np.stack([t.percent[sign][i] for _, t in rows])
            low = np.stack([t.ci_low[sign][i] for _, t in rows])
            high = np.stack([t.ci_high[sign][i] for _, t in rows])
            panels.append(
                plots.Panel(
                    f"{SIGN_NAMES[sign]} — change (pp)",
                    mat,
                    names,
                    languages,
                    low,
                    high,
                    True,
                    ylabel="mask condition",
                    margin=rep.margin[sign],
                )
            )
            for (s, t), r_mat, r_low, r_high in zip(rows, mat, low, high):
                for j, train in enumerate(languages):
                    csv_rows.append(
                        {
                            "run": label,
                            "condition": s.condition,
                            "test_lang": lang,
                            "train_lang": train,
                            "sign": sign,
                            "percent": r_mat[j],
                            "ci_low": r_low[j],
                            "ci_high": r_high[j],
                            "n_test": int(t.n_test[i]),
                            "marked": bool(excludes_zero(r_low[j], r_high[j], rep.margin[sign])),
                        }
                    )
        key = _slug(f"focus_{lang}_{label}")
        title = f"{label}: test language {lang}, masks vs full model"
        png = plots.plot_heatmaps(rep.path(key, "png"), panels, title, rep.marked_note())
        csv_path = write_rows_csv(rep.path(key, "csv"), csv_rows, ["run", "condition", *_TABLE_COLUMNS, "marked"])
        sentence = (
            f"For {lang} test examples only: change in each training language's share when the test example is run "
            f"under its own, random (shuffled) or another language's mask instead of the full model, in `{label}`."
        )
        rep.items.append(
            Item(key, title, sentence, "Fig 3" if rows[0][0].kind == "full" else "", png, csv_path)
        )


def _dynamics(rep: _Report, sources: list[Source]) -> dict[str, list[SpecialisationPoint]]:
    """Figs 10/17/18: in-language share of the positive top-m per checkpoint; also Fig 7's points."""
    panels, csv_rows, matrix_rows = [], [], []
    points_by_source: dict[str, list[SpecialisationPoint]] = {}
    for src in sources:
        top = src.top
        if "pos_idx_by_epoch" not in top.arrays or top["pos_idx_by_epoch"].shape[0] == 0:
            rep.missing.append(
                f"{src.name}: per-checkpoint rankings (rerun influence with per_checkpoint: true)"
            )
            continue
        kept = kept_indices([top])
        rows = np.flatnonzero(np.isin(top["test_indices"], kept))
        codes = top.test_codes()[rows]
        all_codes = top.test_codes()
        series = {lang: ([], [], [], []) for lang in top.languages}
        points = []
        for e_pos, epoch in enumerate(top.epochs):
            # the whole per-checkpoint matrix (CSV); its diagonal is the language specialisation
            table = condition_table(top, kept, rep.options, f"{src.condition}@{epoch}", e_pos)
            matrix_rows += _table_rows(table, {"run": src.label, "condition": src.condition, "epoch": epoch})
            correct = top["test_correct_by_epoch"][e_pos] if "test_correct_by_epoch" in top.arrays else None
            for li, lang in enumerate(top.languages):
                n = int((codes == li).sum())
                if n == 0:
                    continue
                acc = float(correct[all_codes == li].mean() * 100) if correct is not None else float("nan")
                mean, low, high = (t["pos"][li, li] for t in (table.percent, table.ci_low, table.ci_high))
                s = series[lang]
                s[0].append(epoch)
                s[1].append(mean)
                s[2].append(low)
                s[3].append(high)
                points.append(SpecialisationPoint(lang, epoch, float(mean), acc, n))
                csv_rows.append(
                    {
                        "run": src.label,
                        "condition": src.condition,
                        "test_lang": lang,
                        "epoch": epoch,
                        "in_language_percent": mean,
                        "ci_low": low,
                        "ci_high": high,
                        "accuracy": acc,
                        "n_test": n,
                    }
                )
        panels.append(
            (
                src.name,
                [
                    plots.Series(lang, np.array(v[0]), np.array(v[1]), np.array(v[2]), np.array(v[3]))
                    for lang, v in series.items()
                    if v[0]
                ],
            )
        )
        points_by_source[src.name] = points
    if panels:
        key = "dynamics_in_language"
        png = plots.plot_lines(
            rep.path(key, "png"),
            panels,
            "epoch (checkpoint)",
            "in-language % of positive top-m",
            "Language specialisation per checkpoint",
        )
        csv_path = write_rows_csv(
            rep.path(key, "csv"),
            csv_rows,
            [
                "run",
                "condition",
                "test_lang",
                "epoch",
                "in_language_percent",
                "ci_low",
                "ci_high",
                "accuracy",
                "n_test",
            ],
        )
        sentence = (
            "Per checkpoint (not summed), the share of each test language's positive top-m that comes from its own "
            "language, for every run and condition ranked, over the test examples the last checkpoint classifies "
            "correctly; bands are bootstrap 95% CIs."
        )
        matrices = write_rows_csv(
            rep.path("dynamics_matrices", "csv"), matrix_rows, ["run", "condition", "epoch", *_TABLE_COLUMNS]
        )
        rep.items.append(
            Item(
                key,
                "Language specialisation over epochs",
                sentence,
                "Figs 10, 17, 18",
                png,
                csv_path,
                f"Per-checkpoint contribution matrices (both signs, with CIs): [{matrices.name}]({matrices.name})",
            )
        )
    return points_by_source


def _specialisation_accuracy(rep: _Report, points_by_source: dict[str, list[SpecialisationPoint]]) -> None:
    for name, points in points_by_source.items():
        if len(points) < 3 or not all(np.isfinite(p.accuracy) for p in points):
            continue
        corr = specialisation_vs_accuracy(points)
        key = _slug(f"specialisation_vs_accuracy_{name}")
        png = plots.plot_scatter(
            rep.path(key, "png"),
            [p.specialisation for p in points],
            [p.accuracy for p in points],
            [f"{p.lang}@{p.epoch}" for p in points],
            "in-language % of positive top-m",
            "accuracy (%)",
            f"{name}: specialisation vs accuracy",
            corr.slope,
            corr.intercept,
            corr.describe(),
        )
        rows = [
            {
                "lang": p.lang,
                "epoch": p.epoch,
                "specialisation": p.specialisation,
                "accuracy": p.accuracy,
                "n_test": p.n_examples,
            }
            for p in points
        ]
        rows.append({"lang": "ALL", "epoch": "", **{f"stat_{k}": v for k, v in corr.as_dict().items()}})
        cols = [
            "lang",
            "epoch",
            "specialisation",
            "accuracy",
            "n_test",
            *[f"stat_{k}" for k in corr.as_dict()],
        ]
        csv_path = write_rows_csv(rep.path(key, "csv"), rows, cols)
        sentence = (
            f"Each point is one test language at one checkpoint of `{name}`: its in-language share of the positive "
            f"top-m against its test accuracy at that checkpoint. {corr.describe()}."
        )
        rep.items.append(Item(key, f"{name}: specialisation vs accuracy", sentence, "Fig 7", png, csv_path))


def _find_subnetworks(dirs: list[Path], languages: list[str]) -> tuple[dict[str, np.ndarray], Path | None]:
    for d in dirs:
        folder = d / "subnetworks"
        if all((folder / f"{lang}.json").is_file() for lang in languages):
            return load_subnetworks(folder, languages), folder
    return {}, None


def _mask_sections(rep: _Report, sources: list[Source], run_dirs: list[Path], languages: list[str]) -> None:
    try:
        subnets, folder = _find_subnetworks(run_dirs, languages)
    except MaskError as err:
        rep.missing.append(f"subnetworks unusable: {err}")
        return
    if folder is None:
        rep.missing.append(
            "subnetworks/<lang>.json for "
            + ", ".join(languages)
            + " (in "
            + " or ".join(str(d) for d in run_dirs)
            + ")"
            + ": mask figures (Table 1, Figs 8, 9, 12-16) skipped"
        )
        return
    shape = next(iter(subnets.values())).shape
    # Table 1
    stats_csv = folder / "stats" / "table1_disabled_heads.csv"
    if stats_csv.is_file():
        rows = _read_csv(stats_csv)
        source_note = f"from {stats_csv}"
    else:
        rows = [
            {
                "language": lang,
                "disabled_heads": int((m == 0).sum()),
                "total_heads": int(m.size),
                "percent_disabled": 100.0 * (m == 0).sum() / m.size,
            }
            for lang, m in subnets.items()
        ]
        source_note = f"computed from {folder}/<lang>.json (no stats/table1_disabled_heads.csv)"
    csv_path = write_rows_csv(
        rep.path("table1_disabled_heads", "csv"), rows, list(rows[0]) if rows else ["language"]
    )
    rep.items.append(
        Item(
            "table1_disabled_heads",
            "Disabled heads per language",
            f"Number of attention heads each language's subnetwork disables ({source_note}).",
            "Table 1",
            None,
            csv_path,
            _markdown_table(rows),
        )
    )
    # Fig 12: head usage
    usage = head_usage(subnets)
    png = plots.plot_heatmaps(
        rep.path("head_usage", "png"),
        [
            plots.Panel(
                "languages enabling each head",
                usage.astype(float),
                [str(i) for i in range(shape[0])],
                [str(j) for j in range(shape[1])],
                xlabel="head",
                ylabel="layer",
                fmt="{:.0f}",
            )
        ],
    )
    rows = [
        {"layer": i, "head": j, "languages": int(usage[i, j])}
        for i in range(shape[0])
        for j in range(shape[1])
    ]
    rep.items.append(
        Item(
            "head_usage",
            "Head usage across languages",
            "For each head (layer × head), how many languages' subnetworks enable it (0 = none, "
            f"{len(languages)} = all).",
            "Fig 12",
            png,
            write_rows_csv(rep.path("head_usage", "csv"), rows, ["layer", "head", "languages"]),
        )
    )
    # Figs 13-15 and Fig 8 (left)
    absolute = pair_matrix(subnets, languages, overlap_count)
    percent = pair_matrix(subnets, languages, overlap_percent)
    cosine = pair_matrix(subnets, languages, mask_cosine)
    png = plots.plot_heatmaps(
        rep.path("mask_overlap", "png"),
        [
            plots.Panel(
                "% of row language's heads shared with column language",
                percent,
                languages,
                languages,
                xlabel="language",
                ylabel="language",
                fmt="{:.0f}",
            ),
            plots.Panel(
                "shared heads (count)",
                absolute,
                languages,
                languages,
                xlabel="language",
                ylabel="language",
                fmt="{:.0f}",
            ),
        ],
    )
    rows = [
        {
            "lang_a": a,
            "lang_b": b,
            "overlap_heads": absolute[i, j],
            "overlap_percent_of_a": percent[i, j],
            "cosine": cosine[i, j],
        }
        for i, a in enumerate(languages)
        for j, b in enumerate(languages)
    ]
    rep.items.append(
        Item(
            "mask_overlap",
            "Subnetwork overlap",
            "Heads shared by each pair of language subnetworks, as a % of the row language's enabled heads "
            "(asymmetric) and as a count.",
            "Figs 13-15",
            png,
            write_rows_csv(rep.path("mask_overlap", "csv"), rows, list(rows[0])),
        )
    )
    png = plots.plot_heatmaps(
        rep.path("mask_cosine", "png"),
        [
            plots.Panel(
                "cosine similarity of flattened masks",
                cosine,
                languages,
                languages,
                xlabel="language",
                ylabel="language",
                fmt="{:.2f}",
            )
        ],
    )
    rep.items.append(
        Item(
            "mask_cosine",
            "Subnetwork similarity",
            "Cosine similarity between the flattened 0/1 head masks of each language pair.",
            "Fig 8 (left)",
            png,
            write_rows_csv(rep.path("mask_cosine", "csv"), rows, list(rows[0])),
        )
    )
    # Figs 8 (right), 9, 16 per source whose masks differ between languages
    for src in sources:
        try:
            names = condition_masks(src.condition, src.top.languages)
            masks = {
                lang: resolve_mask(names[lang], subnets, shape) for lang in src.top.languages if lang in names
            }
        except MaskError as err:
            rep.notes.append(f"{src.name}: masks not resolvable for correlations ({err})")
            continue
        if len(masks) != len(languages) or len({m.tobytes() for m in masks.values()}) < 2:
            continue
        table = condition_table(src.top, kept_indices([src.top]), rep.options, src.condition)
        cos = pair_matrix(masks, languages, mask_cosine)
        ovl = pair_matrix(masks, languages, overlap_percent)
        for key_base, sim, sign, xlabel, paper, what in (
            ("cosine_vs_positive", cos, "pos", "mask cosine similarity", "Fig 8 (right)", "positive"),
            (
                "overlap_vs_negative",
                ovl,
                "neg",
                "% of test language's heads shared with train language",
                "Fig 16",
                "negative",
            ),
        ):
            pts = cross_language_points(sim, table.percent[sign], languages)
            key = _slug(f"{key_base}_{src.name}")
            png = plots.plot_scatter(
                rep.path(key, "png"),
                pts.x,
                pts.y,
                [f"{a}←{b}" for a, b in zip(pts.test_lang, pts.train_lang)],
                xlabel,
                f"{what} influence from train language (%)",
                f"{src.name}",
                pts.correlation.slope,
                pts.correlation.intercept,
                pts.correlation.describe(),
            )
            rows = pts.rows("similarity", f"{what}_percent")
            rows.append(
                {"test_lang": "ALL", **{f"stat_{k}": v for k, v in pts.correlation.as_dict().items()}}
            )
            csv_path = write_rows_csv(
                rep.path(key, "csv"),
                rows,
                [
                    "test_lang",
                    "train_lang",
                    "similarity",
                    f"{what}_percent",
                    *[f"stat_{k}" for k in pts.correlation.as_dict()],
                ],
            )
            sentence = (
                f"One point per ordered language pair (test ← train) in `{src.name}`: {xlabel} against the train "
                f"language's share of the test language's {what} top-m. {pts.correlation.describe()}."
            )
            rep.items.append(
                Item(key, f"{src.name}: {xlabel} vs {what} influence", sentence, paper, png, csv_path)
            )
        layers = per_layer_correlations(masks, languages, table.percent["pos"])
        key = _slug(f"layer_cosine_vs_positive_{src.name}")
        png = plots.plot_bars(
            rep.path(key, "png"),
            [str(i) for i in range(len(layers))],
            [c.pearson_r for c in layers],
            f"{src.name}: per-layer mask cosine vs positive influence",
            "Pearson r",
            [f"p={c.pearson_p:.2g}" if np.isfinite(c.pearson_p) else "n/a" for c in layers],
            "layer",
        )
        rows = [{"layer": i, **c.as_dict()} for i, c in enumerate(layers)]
        rep.items.append(
            Item(
                key,
                f"{src.name}: per-layer similarity vs positive influence",
                "For each layer, the correlation over ordered language pairs between that layer's mask cosine "
                f"and positive cross-language influence in `{src.name}` (n/a: the layer's masks are identical "
                "for all languages).",
                "Fig 9",
                png,
                write_rows_csv(rep.path(key, "csv"), rows, list(rows[0]) if rows else ["layer"]),
            )
        )


def _accuracy_tables(rep: _Report, sources: list[Source], run_dirs: list[Path]) -> None:
    for d in run_dirs:
        path = d / "accuracy" / "accuracy.csv"
        if path.is_file():
            rows = _read_csv(path)
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
                    _markdown_table(rows),
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
        wide = _pivot(rows)
        rep.items.append(
            Item(
                "accuracy_from_sketches",
                "Accuracy per condition (final checkpoint)",
                "Test accuracy per test language of every ranked condition at the last checkpoint, from the "
                "sketches' `correct` flags (the examples that enter the influence filter).",
                "Table 2 (companion)",
                None,
                csv_path,
                _markdown_table(wide),
            )
        )


def _fidelity(rep: _Report, sources: list[Source], run_dir: Path) -> None:
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
                _markdown_table(rows),
            )
        )


def _drilldown(rep: _Report, sources: list[Source], run_dir: Path) -> None:
    own = [s for s in sources if s.run_dir == run_dir]
    if not own or rep.options.explain_per_language < 1:
        return
    src = next((s for s in own if s.condition == "own"), own[0])
    texts = _load_texts(rep)
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
                + (f": {_short(ex.test_text)}" if ex.test_text else f" id `{_test_id(src.top, test_index)}`")
            )
            for sign, items in (("+", ex.positive), ("−", ex.negative)):
                for it in items:
                    body = _short(it.text) if it.text else f"id `{it.id}`"
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


def _test_id(top: TopKFile, test_index: int) -> str:
    if "test_ids" not in top.arrays:
        return ""
    return str(top["test_ids"][np.flatnonzero(top["test_indices"] == test_index)[0]])


def _load_texts(rep: _Report) -> Mapping | None:
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


def _short(text: str | None, n: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------- output


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pivot(rows: list[dict]) -> list[dict]:
    langs = list(dict.fromkeys(r["test_lang"] for r in rows))
    cols = list(dict.fromkeys(f"{r['run']}:{r['condition']}" for r in rows))
    table = {lang: {"test_lang": lang} for lang in langs}
    for r in rows:
        table[r["test_lang"]][f"{r['run']}:{r['condition']}"] = f"{r['accuracy']:.1f}"
    return [{k: table[lang].get(k, "") for k in ["test_lang", *cols]} for lang in langs]


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if not np.isfinite(v) else f"{v:.3g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)



def describe_run_backbone(run_dir: Path) -> str:
    """One line from the run's ``backbone.json`` (written by ``crossling fit``): which weights were studied."""
    path = Path(run_dir) / "backbone.json"
    if not path.is_file():
        return "not recorded (run trained before crossling recorded backbone.json)"
    record = json.loads(path.read_text())
    parts = [f"`{record.get('backbone')}`"]
    if record.get("model") and record.get("model") != record.get("backbone"):
        parts.append(f"= {record['model']}")
    if record.get("weights"):
        parts.append(f"({record['weights']}" + (f", {record['package']}" if record.get("package") else "") + ")")
    heads = record.get("heads")
    if heads:
        parts.append(f"; {heads[0]} layers x {heads[1]} heads")
    if record.get("vocabulary", "full") != "full":
        parts.append(f"; vocabulary cut to the {record['vocabulary']} data's tokens")
    return " ".join(parts).replace(" ; ", "; ")


def _render_markdown(rep: _Report, header: list[str]) -> str:
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


def _render_html(rep: _Report, title: str, header_md: list[str]) -> str:
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p>{esc(line.lstrip('- '))}</p>" for line in header_md[1:] if line.strip()]
    for item in rep.items:
        tag = f" ({item.paper})" if item.paper else ""
        parts.append(f"<h2>{esc(item.title + tag)}</h2><p>{esc(item.sentence)}</p>")
        if item.png:
            parts.append(f"<img src='{esc(item.png.name)}' alt='{esc(item.title)}'>")
        if item.csv and item.csv.suffix == ".csv":
            rows = _read_csv(item.csv)
            if item.png is None and rows and len(rows) <= 80:
                cols = list(rows[0])
                parts.append(
                    "<table><tr>"
                    + "".join(f"<th>{esc(c)}</th>" for c in cols)
                    + "</tr>"
                    + "".join(
                        "<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                        for r in rows
                    )
                    + "</table>"
                )
            parts.append(f"<p><a href='{esc(item.csv.name)}'>{esc(item.csv.name)}</a></p>")
        if item.key == "drilldown" and item.markdown:
            parts.append("<pre style='white-space:pre-wrap'>" + esc(item.markdown) + "</pre>")
    if rep.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in rep.notes) + "</ul>")
    parts.append(
        "<h2>Missing inputs</h2><ul>"
        + ("".join(f"<li>{esc(m)}</li>" for m in rep.missing) or "<li>None</li>")
        + "</ul>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _projection_error_lines(errors: dict[Path, ProjectionError | None], margin: dict[str, float]) -> list[str]:
    """The header's account of the sketch's own error and of the marking rule built on it."""
    lines = [
        f"- projection error of `{run_label(d)}`: "
        + (e.describe() if e else "not measured (run `crossling analyze --stages [fidelity]`)")
        for d, e in errors.items()
    ]
    if any(margin.values()):
        lines.append(
            f"- marked changes (*): the 95% interval clears zero by more than the largest measured share error, "
            f"{margin['pos']:.2f} pp (positive) / {margin['neg']:.2f} pp (negative); a smaller change could be the "
            "projection's"
        )
    else:
        lines.append("- marked changes (*): the 95% interval excludes zero (no projection error measured to add)")
    return lines


def write_report(
    run_dir: Path,
    conditions: list[str],
    options: InfluenceOptions,
    compare_to: Path | None = None,
    texts_by_index: Mapping[str, Mapping] | None = None,
) -> Path:
    """Build ``<run_dir>/report/`` from whatever the run's stages produced; returns the path of report.md."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(out, options, texts=texts_by_index)
    errors = {run_dir: load_projection_error(run_dir)}
    if compare_to is not None:
        errors[Path(compare_to)] = load_projection_error(compare_to)
    rep.margin = marking_margin(list(errors.values()))
    kind = detect_run_kind(run_dir, options.run_kind)
    sources = _load_sources(run_dir, conditions, kind, rep, all_present=False)
    run_dirs = [run_dir]
    if compare_to is not None:
        compare_to = Path(compare_to)
        run_dirs.append(compare_to)
        sources += _load_sources(
            compare_to,
            ["full"],
            detect_run_kind(compare_to),
            rep,
            all_present=True,
            label_taken=run_label(run_dir),
        )
    languages = sources[0].top.languages if sources else []
    for src in sources[1:]:
        if src.top.languages != languages:
            rep.notes.append(
                f"{src.name} uses language order {src.top.languages}, expected {languages}: left out"
            )
    sources = [s for s in sources if s.top.languages == languages]

    if sources:
        _absolute(rep, sources)
        diffs = _differences(rep, sources)
        _focus_language(rep, sources, diffs)
        points = _dynamics(rep, sources)
        _specialisation_accuracy(rep, points)
        _mask_sections(rep, sources, run_dirs, languages)
        _accuracy_tables(rep, sources, run_dirs)
        _fidelity(rep, sources, run_dir)
        _drilldown(rep, sources, run_dir)

    first = sources[0].top.meta if sources else {}
    title = f"crossling report: {run_label(run_dir)}"
    header = [
        f"# {title}",
        "",
        f"- run: `{run_dir}` (kind: {kind})" + (f"; compared with `{compare_to}`" if compare_to else ""),
        f"- encoder: {describe_run_backbone(run_dir)}",
        f"- conditions requested: {', '.join(conditions)}; ranked: {', '.join(s.name for s in sources) or 'none'}",
        f"- TracIn: normalization `{first.get('options', {}).get('normalization', options.normalization)}`, "
        f"top-m = {first.get('m', options.m)}, checkpoints (epochs) {first.get('epochs', '?')}, "
        f"lr weights {first.get('options', {}).get('lr_weights')}",
        f"- gradient sketches: d = {first.get('d', '?')}, projection {json.dumps(first.get('projection'))}",
        f"- bootstrap: {options.bootstrap_resamples} resamples over test examples, {int(options.ci_level * 100)}% "
        "percentile intervals (paired for differences); only test examples every compared model classifies correctly",
        f"- languages (axis order): {', '.join(languages)}",
        *_projection_error_lines(errors, rep.margin),
    ]
    md = _write_text(out / "report.md", _render_markdown(rep, header))
    _write_text(out / "report.html", _render_html(rep, title, header))
    _write_text(
        out / "items.json",
        json.dumps(
            [
                {
                    "key": i.key,
                    "title": i.title,
                    "paper": i.paper,
                    "png": i.png.name if i.png else None,
                    "csv": i.csv.name if i.csv else None,
                }
                for i in rep.items
            ],
            indent=2,
        ),
    )
    if options.wandb:
        log_report_to_wandb(out)
    return md


def build_report(
    run_dir: Path,
    conditions: list[str],
    options: InfluenceOptions | None = None,
    compare_to: Path | None = None,
    texts_by_index: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Write ``<run_dir>/report/`` (figures, tables, report.md, report.html); returns the report.md path.

    Args:
        run_dir: the run whose ``influence/<condition>`` rankings are reported.
        conditions: the conditions to report (missing ones are listed, not fatal).
        options: the stage options (bootstrap, focus language, drill-down, fidelity reference...).
        compare_to: another run (e.g. the full fine-tuning run of an SFT run); its rankings, subnetworks
            and accuracy table are used for the cross-run comparisons.
        texts_by_index: optional ``{"train": {index: text}, "test": {index: text}}`` for the drill-down
            (overrides ``options.texts``); rankings store ids, not text.
    """
    return write_report(
        Path(run_dir),
        conditions,
        options or InfluenceOptions(),
        Path(compare_to) if compare_to else None,
        texts_by_index,
    )


def log_report_to_wandb(report_dir: Path) -> bool:
    """Log the report's figures and tables to the active W&B run; does nothing (False) if there is none.

    wandb is imported only if the caller already imported it, so a report never starts a W&B run
    or pays wandb's import time by itself.
    """
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    report_dir = Path(report_dir)
    payload = {}
    for png in sorted(report_dir.glob("*.png")):
        payload[f"report/{png.stem}"] = wandb.Image(str(png))
    for path in sorted(report_dir.glob("*.csv")):
        rows = _read_csv(path)
        if rows:
            payload[f"report/{path.stem}_table"] = wandb.Table(
                columns=list(rows[0]), data=[list(r.values()) for r in rows]
            )
    wandb.log(payload)
    return True
