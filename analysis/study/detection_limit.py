"""The detection limit: over planted studies that differ only in the share of the planted language's items
that carry the marker, the smallest share at which each of the study's measures still finds the effect.

Why: a measure that finds nothing in the natural study (no language's removal rising above its noise, no
in-language share rising) says something about the model only where the same measure, at the same size,
finds an effect of known size. The planted sweep gives that size; this module reads what each planted
study's counterfactual check recorded (``<seed root>/full/counterfactual/counterfactual.json``, key
``planted``) and applies one stated rule per measure:

- retraining: the planted cell ranks first, its interval excludes zero and, where refits measured
  retraining's noise, it exceeds the refits' largest change;
- TracIn's prediction: the planted cell ranks first and exceeds the random control's prediction;
- the top-m share: the planted language's share of the marked test items' top m exceeds the unmarked ones';
- each method's ranking: the marked test items find the marked training items better than the unmarked test
  items do (permutation p < 0.05).

A measure is detected at a share when every seed analysed detects it; its limit is the smallest share from
which it is detected at that share and every larger one. numpy and matplotlib only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import save_figure, write_json_atomic, write_text_atomic
from ..layout import COUNTERFACTUAL, DETECTION_SWEEP, FULL, STUDY_RECORDS
from ..planted import METHOD_NAMES
from .pooled import seed_roots

ALPHA = 0.05
RULES = {
    "retraining": "planted cell first, interval above zero (and above the refits' largest change where measured)",
    "TracIn's prediction": "planted cell first, above the random control's prediction",
    "top-m share": "the planted language's share of the marked test items' top m above the unmarked items'",
    "ranking": f"marked test items find the marked training items better than unmarked ones (permutation p < {ALPHA})",
}


class DetectionLimitError(ValueError):
    """A planted study that cannot enter the sweep (no planted record, or another language)."""


@dataclass(frozen=True)
class PlantedStudy:
    """One planted study's records: its root, the share planted, and each seed's ``counterfactual.json``."""

    root: Path
    language: str
    fraction: float
    records: Mapping[int, dict]


def read_planted_study(root: str | Path) -> PlantedStudy:
    """Every seed's planted record of a study root (seeds whose check has not run are left out)."""
    root = Path(root)
    records = {}
    for seed, folder in seed_roots(root).items():
        path = folder / FULL / COUNTERFACTUAL / "counterfactual.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except ValueError as err:
            raise DetectionLimitError(f"{path}: not JSON ({err})") from None
        planted = record.get("planted")
        if not isinstance(planted, dict) or "fraction" not in planted:
            raise DetectionLimitError(f"{path}: no planted control recorded (key 'planted'): not a planted study")
        records[seed] = record
    if not records:
        raise DetectionLimitError(f"{root}: no seed's counterfactual check has run yet "
                                  f"(expected <seed root>/{FULL}/{COUNTERFACTUAL}/counterfactual.json)")
    shares = {(r["planted"]["language"], float(r["planted"]["fraction"])) for r in records.values()}
    if len(shares) != 1:
        raise DetectionLimitError(f"{root}: its seeds planted different things {sorted(shares)}")
    (language, fraction), = shares
    return PlantedStudy(root, language, fraction, records)


def verdicts(record: Mapping) -> dict[str, tuple[float | None, bool | None]]:
    """(the measure's value, detected) for each measure in one seed's check; (None, None) where the check
    did not record the measure (e.g. no retraining or no other method scored)."""
    planted = record["planted"]
    language = planted["language"]
    out: dict[str, tuple[float | None, bool | None]] = {}
    retrained, predicted = planted.get("retrained"), planted.get("predicted")
    if retrained:
        floor = (record.get("noise_floor") or {}).get(language)
        above_noise = floor is None or abs(retrained["value"]) > floor
        out["retraining"] = (retrained["value"], retrained["rank"] == 1 and retrained["low"] > 0 and above_noise)
    if predicted:
        out["TracIn's prediction"] = (predicted["value"],
                                      predicted["rank"] == 1 and predicted["value"] > predicted["control"])
    retrieval = planted.get("retrieval") or {}
    if retrieval.get("m"):
        gap = retrieval["top_m_share_marked"] - retrieval["top_m_share_unmarked"]
        out["top-m share"] = (gap, gap > 0)
    for method, found in {"tracin": retrieval, **(planted.get("retrieval_by_method") or {})}.items():
        if not found or not found.get("n_test"):
            continue
        p = found.get("ap_p")
        detected = None if p is None or not math.isfinite(p) else p < ALPHA
        out[f"ranking: {METHOD_NAMES.get(method, method)}"] = (found["mean_ap"] / found["chance"], detected)
    return out


def detection_table(studies: Sequence[PlantedStudy]) -> list[dict]:
    """One row per measure: its value and verdict at each share (largest first) and its detection limit."""
    studies = sorted(studies, key=lambda s: -s.fraction)
    if len({s.language for s in studies}) > 1:
        raise DetectionLimitError("the planted studies plant different languages: "
                                  + ", ".join(f"{s.root}: {s.language}" for s in studies))
    if len({s.fraction for s in studies}) < len(studies):
        raise DetectionLimitError("two planted studies plant the same share: "
                                  + ", ".join(f"{s.root}: {s.fraction:g}" for s in studies))
    by_study = [{seed: verdicts(r) for seed, r in s.records.items()} for s in studies]
    measures = list(dict.fromkeys(m for seeds in by_study for v in seeds.values() for m in v))
    rows = []
    for measure in measures:
        cells, detected_at = {}, []
        for study, seeds in zip(studies, by_study):
            found = [v[measure] for v in seeds.values() if measure in v]
            values = [value for value, _ in found if value is not None]
            marks = [ok for _, ok in found]
            verdict = None if not found or any(m is None for m in marks) else all(marks)
            cells[study.fraction] = (sum(values) / len(values) if values else None, verdict, len(found))
            detected_at.append(verdict)
        rows.append({"measure": measure, "cells": cells, "limit": detection_limit(
            [s.fraction for s in studies], detected_at)})
    return rows


def detection_limit(fractions: Sequence[float], detected: Sequence[bool | None]) -> float | None:
    """The smallest of ``fractions`` (given largest first) at which, and at every larger one, the measure was
    detected; None when it was not detected at the largest (or the largest has no verdict)."""
    limit = None
    for fraction, ok in zip(fractions, detected):
        if ok is not True:
            break
        limit = fraction
    return limit


def _value(measure: str, value: float | None) -> str:
    if value is None:
        return "–"
    if measure.startswith("ranking"):
        return f"{value:.1f} × chance"
    if measure == "top-m share":
        return f"{100 * value:+.1f} points"
    return f"{value:+.4f}"


def limit_text(row: dict) -> str:
    """The limit as the table says it: a share, "not detected", or which share's missing verdict stops it."""
    if row["limit"] is not None:
        return f"{100 * row['limit']:g} %"
    largest = max(row["cells"])
    return "not detected" if row["cells"][largest][1] is False else f"no verdict at {100 * largest:g} %"


def markdown_rows(rows: list[dict]) -> list[dict]:
    """The table as the report sets it: a column per share, ✓ detected, ✗ not, ? no verdict recorded."""
    out = []
    for row in rows:
        line = {"measure": row["measure"]}
        for fraction, (value, verdict, _) in row["cells"].items():
            mark = {True: "✓", False: "✗", None: "?"}[verdict]
            line[f"{100 * fraction:g} % planted"] = f"{mark} {_value(row['measure'], value)}"
        line["detected down to"] = limit_text(row)
        out.append(line)
    return out


def plot_detection(rows: list[dict], path: Path) -> Path:
    """Measures × planted shares as a grid of marks: filled where detected, hollow where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({f for row in rows for f in row["cells"]}, reverse=True)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(fractions), 0.9 + 0.42 * len(rows)))
    for y, row in enumerate(rows):
        for x, fraction in enumerate(fractions):
            _, verdict, _ = row["cells"].get(fraction, (None, None, 0))
            style = {True: dict(color="#2a7a2a", marker="o"), False: dict(color="#b03030", marker="o", mfc="none"),
                     None: dict(color="#999999", marker="$?$")}[verdict]
            ax.plot(x, y, ms=11, mew=1.6, ls="none", **style)
    ax.set_xticks(range(len(fractions)), [f"{100 * f:g} %" for f in fractions])
    ax.set_yticks(range(len(rows)), [row["measure"] for row in rows])
    ax.set_xlim(-0.5, len(fractions) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("share of the language's items planted")
    ax.set_title("detected (filled) or not (hollow)", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def write_detection_limit(studies: Sequence[PlantedStudy], out_dir: str | Path) -> dict[str, Path]:
    """``detection_limit.{json,md,png}`` in ``out_dir`` from the planted studies (``read_planted_study``)."""
    from ..report.render import markdown_table

    rows = detection_table(studies)
    out_dir = Path(out_dir)
    record = {"language": studies[0].language, "rules": RULES, "alpha": ALPHA,
              "studies": {str(s.root): s.fraction for s in studies},
              "measures": [{"measure": r["measure"], "limit": r["limit"],
                            "cells": {f"{f:g}": {"value": v, "detected": d, "seeds": n}
                                      for f, (v, d, n) in r["cells"].items()}} for r in rows]}
    rules = "\n".join(f"- **{name}**: {rule}." for name, rule in RULES.items())
    md = "\n".join([f"Planted language {studies[0].language}; a measure is detected (✓) at a share when every seed "
                    "analysed detects it, and its limit is the smallest share from which it is detected at that "
                    "share and every larger one. Rules:", "", rules, "", markdown_table(markdown_rows(rows)), ""])
    return {"json": write_json_atomic(out_dir / "detection_limit.json", record),
            "md": write_text_atomic(out_dir / "detection_limit.md", md),
            "png": plot_detection(rows, out_dir / "detection_limit.png")}


def detection_section(root: str | Path, out_dir: str | Path) -> list[str]:
    """The front page's section on the planted sweep the study runner recorded for ``root``
    (``.study/detection_limit.json``): the table and figure from the studies that have run, and the command
    for each that has not. Empty when the study names no sweep."""
    path = Path(root) / STUDY_RECORDS / DETECTION_SWEEP
    try:
        studies = json.loads(path.read_text())["studies"]
    except (OSError, ValueError, KeyError):
        return []
    ran, waiting = [], []
    for study in studies:
        try:
            ran.append(read_planted_study(study["root"]))
        except DetectionLimitError as err:
            waiting.append(f"`crossling study --config {study['config']}` ({err})")
    md = ["## The detection limit (planted sweep)", ""]
    if ran:
        try:
            written = write_detection_limit(ran, out_dir)
        except DetectionLimitError as err:
            return [*md, f"Not drawn: {err}.", ""]
        md += [Path(written["md"]).read_text(), f"![detection limit]({Path(out_dir).name}/{written['png'].name})", ""]
    if waiting:
        md += ["Not run yet, or not checked:", "", *(f"- {w}" for w in waiting), ""]
    return md
