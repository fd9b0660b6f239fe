"""The paper's comparisons under each attribution method a study ran (study key ``attribution_methods``).

Why: the paper's findings (Fig 2: the own subnetwork raises a language's in-language share; Fig 4: SFT
raises it; Fig 6: shuffled subnetworks do not) are read off TracIn's rankings. Whether they are findings
about the model or about TracIn shows when another method ranks the same runs: a comparison that keeps
its sign and its mark under every method rests on more than one approximation. Each method's rankings
are pooled over seeds exactly as TracIn's are (``pooled.pooled_influence``); beside them, what each
method cost in the study (its stages' time and peak memory, from the runner's records).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contributions import write_rows_csv
from ..influence.options import METHODS
from ..influence.topk_file import influence_dir_name
from ..layout import FULL, STUDY_RECORDS, is_method_stage
from ..plots import ForestPanel, plot_forest
from ..report.render import markdown_table
from ..seed_pooling import ALL
from .pooled import PooledFinding, pooled_influence, seed_roots

COMPARISON_CSV = "attribution_methods.csv"
COMPARISON_PNG = "attribution_methods.png"


@dataclass(frozen=True)
class MethodCost:
    """What a method's stages took in the study: summed wall time and the largest peak resident memory."""

    seconds: float
    peak_mb: int
    stages: int


def methods_ranked(root: Path) -> list[str]:
    """The attribution methods whose rankings some seed's fully fine-tuned run holds, TracIn first."""
    roots = seed_roots(root)
    return [m for m in METHODS
            if any((path / FULL / influence_dir_name(m)).is_dir() for path in roots.values())]


def method_costs(root: Path, methods: list[str]) -> dict[str, MethodCost]:
    """Each method's stages' time and peak memory from the runner's records (``.study/<stage>.json``).
    TracIn's stages also sketch, which TRAK then reuses: TRAK's cost is what it adds."""
    records = []
    for path in sorted((Path(root) / STUDY_RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "seconds" in record:
            records.append((path.stem, record))
    out = {}
    for method in methods:
        mine = [r for stage, r in records if is_method_stage(stage, method)]
        if mine:
            out[method] = MethodCost(sum(float(r["seconds"]) for r in mine),
                                     max(int(r.get("peak_rss_mb") or 0) for r in mine), len(mine))
    return out


def comparison_rows(findings: dict[str, list[PooledFinding]], costs: dict[str, MethodCost]) -> list[dict]:
    """One row per question and method: the pooled change over test languages with its interval, the seeds
    agreeing, whether it is marked, and whether its sign is TracIn's."""
    reference = {f.key: f for f in findings.get("tracin", [])}
    rows = []
    for method, found in findings.items():
        for f in found:
            e, g = f.effect, len(f.effect.groups) - 1  # the last group: over test languages
            assert e.groups[g] == ALL
            ref = reference.get(f.key)
            same = "–" if ref is None or method == "tracin" else (
                "yes" if np.sign(ref.effect.pooled[-1]) == np.sign(e.pooled[g]) else "no")
            cost = costs.get(method)
            rows.append({
                "question": f.key, "paper": f.paper, "method": method, "pooled_pp": float(e.pooled[g]),
                "ci_low": float(e.low[g]), "ci_high": float(e.high[g]), "seeds_agree": int(e.agree()[g]),
                "n_seeds": len(e.seeds), "margin_pp": f.margin, "marked": bool(f.marked[g]),
                "sign_as_tracin": same,
                "stage_minutes": round(cost.seconds / 60, 1) if cost else None,
                "peak_gib": round(cost.peak_mb / 1024, 2) if cost else None,
            })
    return rows


def _table(rows: list[dict]) -> list[dict]:
    return [{"comparison": f"{r['question']}" + (f" ({r['paper']})" if r["paper"] else ""), "method": r["method"],
             "pooled change, pp [95% CI]": f"{r['pooled_pp']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
                                           + ("*" if r["marked"] else ""),
             "seeds agreeing": f"{r['seeds_agree']}/{r['n_seeds']}", "sign as TracIn": r["sign_as_tracin"]}
            for r in rows]


def _cost_table(costs: dict[str, MethodCost]) -> list[dict]:
    return [{"method": m, "stages": c.stages, "time (min, summed)": f"{c.seconds / 60:.1f}",
             "peak memory (GiB)": f"{c.peak_mb / 1024:.2f}"} for m, c in costs.items()]


def method_comparison_section(root: Path, out: Path, tracin: list[PooledFinding] | None = None) -> list[str]:
    """The front page's Markdown for the comparisons under each method (with ``attribution_methods.csv``
    and the forest figure in ``out``); empty unless two methods answer some comparison. ``tracin``: TracIn's
    pooled share findings when the caller has them already (each pooling is a bootstrap over every seed)."""
    methods = methods_ranked(root)
    if len(methods) < 2:
        return []
    findings = {m: found for m in methods
                if (found := (tracin if m == "tracin" and tracin is not None else pooled_influence(root, m)))}
    if len(findings) < 2:  # e.g. EK-FAC alone beside TracIn: it scores no subnetwork, so compares nothing
        return []
    costs = method_costs(root, methods)
    rows = comparison_rows(findings, costs)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / COMPARISON_CSV, rows, list(rows[0]))
    keys = list(dict.fromkeys(r["question"] for r in rows))
    panels = []
    for key in keys:
        mine = [r for r in rows if r["question"] == key]
        paper = f" ({mine[0]['paper']})" if mine[0]["paper"] else ""
        panels.append(ForestPanel(f"{key}{paper}", [r["method"] for r in mine], [r["pooled_pp"] for r in mine],
                                  [r["ci_low"] for r in mine], [r["ci_high"] for r in mine],
                                  [r["marked"] for r in mine]))
    plot_forest(out / COMPARISON_PNG, panels, "change of in-language share (pp)",
                "The paper's comparisons under each attribution method (filled: marked)")
    n_seeds = max(r["n_seeds"] for r in rows)
    md = ["## The paper's comparisons under each attribution method", "",
          f"Each method ranks the same runs' training examples for every test example; its changes of the "
          f"in-language share are pooled over {n_seeds} seed(s) as TracIn's are. * marks an interval that clears "
          "zero (for TracIn and TRAK, which rank the sketches, by more than the projection error). A comparison "
          "that keeps its sign and mark under every method does not rest on one approximation.", "",
          f"![attribution methods]({out.name}/{COMPARISON_PNG})", "", markdown_table(_table(rows)), ""]
    if costs:
        md += ["What each method's stages took in this study (TracIn's include the sketching TRAK reuses):", "",
               markdown_table(_cost_table(costs)), ""]
    md += [f"Data: [{COMPARISON_CSV}]({out.name}/{COMPARISON_CSV})", ""]
    return md
