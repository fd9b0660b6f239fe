"""``write_report``: reads a run's files, runs every section, writes ``report/`` (report.md, report.html,
items.json, one PNG and CSV per item); ``build_report`` is its entry point for the ``report`` stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..atomic import write_text_atomic as write_text
from ..influence import (
    InfluenceOptions,
    run_label,
)
from ..projection_error import ProjectionError, load_projection_error, marking_margin
from .accuracy_section import accuracy_tables
from .drilldown_section import drilldown
from .fidelity_section import fidelity
from .influence_sections import absolute, differences, dynamics, focus_language, specialisation_accuracy
from .items import Report, detect_run_kind, load_sources
from .mask_sections import mask_sections
from .render import read_csv, render_html, render_markdown


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


def describe_projection(projection: dict | None) -> str:
    """The sketch's projection options as a reader wants them ("kronecker, k 64, pairs 4, seed 0"), not JSON."""
    if not projection:
        return "not recorded"
    kind = projection.get("kind", "?")
    rest = ", ".join(f"{key} {value}" for key, value in projection.items() if key != "kind" and value is not None)
    return f"{kind}, {rest}" if rest else str(kind)


def projection_error_lines(errors: dict[Path, ProjectionError | None], margin: dict[str, float]) -> list[str]:
    """The header's account of the sketch's own error and of the marking rule built on it."""
    lines = [
        f"- projection error of `{run_label(d)}`: "
        + (e.describe() if e else "not measured (run `crossling analyze --stages [fidelity]`)")
        for d, e in errors.items()
    ]
    if any(margin.values()):
        lines.append(
            f"- marked changes (*): the 95% interval clears zero by more than the measured mean share error, "
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
    rep = Report(out, options, texts=texts_by_index)
    errors = {run_dir: load_projection_error(run_dir)}
    if compare_to is not None:
        errors[Path(compare_to)] = load_projection_error(compare_to)
    rep.margin = marking_margin(list(errors.values()))
    kind = detect_run_kind(run_dir, options.run_kind)
    sources = load_sources(run_dir, conditions, kind, rep, all_present=False)
    run_dirs = [run_dir]
    if compare_to is not None:
        compare_to = Path(compare_to)
        run_dirs.append(compare_to)
        sources += load_sources(
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
        absolute(rep, sources)
        diffs = differences(rep, sources)
        focus_language(rep, sources, diffs)
        points = dynamics(rep, sources)
        specialisation_accuracy(rep, points)
        mask_sections(rep, sources, run_dirs, languages)
        accuracy_tables(rep, sources, run_dirs)
        fidelity(rep, sources, run_dir)
        drilldown(rep, sources, run_dir)

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
        f"- gradient sketches: d = {first.get('d', '?')}, projection {describe_projection(first.get('projection'))}",
        f"- bootstrap: {options.bootstrap_resamples} resamples over test examples, {int(options.ci_level * 100)}% "
        "percentile intervals (paired for differences); only test examples every compared model classifies correctly",
        f"- languages (axis order): {', '.join(languages)}",
        *projection_error_lines(errors, rep.margin),
    ]
    md = write_text(out / "report.md", render_markdown(rep, header))
    write_text(out / "report.html", render_html(rep, title, header))
    write_text(
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
        rows = read_csv(path)
        if rows:
            payload[f"report/{path.stem}_table"] = wandb.Table(
                columns=list(rows[0]), data=[list(r.values()) for r in rows]
            )
    wandb.log(payload)
    return True

