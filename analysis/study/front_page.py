"""The study's front page: ``<root>/report/report.md`` and ``.html`` open with what the study found (with
several seeds, the pooled findings as one table and the paper's key figure), then the ground-truth and
method sections where the study has them, the figure only a whole study can draw — in-language reliance
over epochs for full FT vs SFT vs random SFT (Figs 10, 17, 18) — and the per-run reports' figures in the
paper's order. The summary ``crossling study`` prints at its end is kept beside it as ``summary.txt``.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import re
from pathlib import Path

from markdown_it import MarkdownIt

from ..atomic import save_figure
from ..atomic import write_text_atomic as _write
from ..counterfactual_report import counterfactual_section
from ..layout import FULL, SFT, sft_random_runs
from ..report.render import MAX_TABLE_ROWS, markdown_table, read_csv
from .detection_limit import detection_section
from .findings import study_findings
from .method_comparison import method_comparison_section
from .pooled import PooledFinding, pooled_rows, pooled_table, seed_roots
from .summary import interim_sentence, pooled_findings, stability_sentence, study_summary

# The paper's order of results; items without a paper number come last.
PAPER_ORDER = ["Table 1", "Fig 12", "Fig 13", "Fig 14", "Fig 15", "Fig 11", "Fig 2", "Fig 3", "Table 2", "Fig 4",
               "Fig 5", "Fig 6", "Fig 10", "Fig 7", "Fig 8", "Fig 9", "Fig 16", "Fig 19"]


def _runs(root: Path) -> list[Path]:
    order = [FULL, SFT] + [run.name for run in sft_random_runs(root).values()]
    return [root / name for name in order if (root / name / "report" / "items.json").is_file()]


def _paper_rank(item: dict) -> int:
    paper = item.get("paper") or ""
    for i, ref in enumerate(PAPER_ORDER):
        if re.search(rf"\b{re.escape(ref)}\b", paper):
            return i
    return len(PAPER_ORDER)


def _read_dynamics(run: Path) -> list[dict]:
    path = run / "report" / "dynamics_in_language.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row | {"run_dir": run.name} for row in csv.DictReader(f)]


def plot_dynamics(rows: list[dict], path: Path) -> bool:
    """In-language share per epoch, mean over test languages, one line per run and condition."""
    import numpy as np
    from matplotlib.figure import Figure

    series: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        run = row["run_dir"]
        own_rows = row["run"].split("/")[-1] == run  # a report also lists the run it was compared with
        primary = {"full": "full", "sft": "own"}.get(run, run.removeprefix("sft-"))
        if not own_rows or row["condition"] != primary:
            continue
        label = f"{run} ({row['condition']})"
        series.setdefault(label, {}).setdefault(int(row["epoch"]), []).append(float(row["in_language_percent"]))
    if not any(len(by_epoch) > 1 for by_epoch in series.values()):
        return False  # one checkpoint per run: dots, not lines over epochs; the runs' tables hold the values
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    shown = sorted({e + 1 for by_epoch in series.values() for e in by_epoch})
    for label, by_epoch in series.items():
        epochs = sorted(by_epoch)
        ax.plot([e + 1 for e in epochs], [np.mean(by_epoch[e]) for e in epochs], marker="o", label=label)
    ax.set_xticks(shown)  # checkpoints are whole epochs; one checkpoint is one tick, not a stretch of decimals
    ax.set_xlim(shown[0] - 0.5, shown[-1] + 0.5)
    ax.set_xlabel("epoch (checkpoint)")
    ax.set_ylabel("in-language share of top-m (%)")
    ax.set_title("In-language reliance per checkpoint", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    return True


def write_seed_pooling(root: Path, out: Path, findings: list) -> list[str]:
    """A study of several training seeds: the pooled findings' table and the subnetworks' stability
    across seeds (``report/mask_stability/``); returns the front page's Markdown for them."""
    from ..contributions import write_rows_csv
    from .mask_stability import load_seed_masks
    from .mask_stability_files import write_mask_stability

    roots = seed_roots(root)
    md = ["## What held across seeds", "",
          f"Training seeds {', '.join(map(str, roots))}: the same data sample, each seed its own fine-tuning, "
          "subnetworks, SFT and analyses. Pooled estimates are the mean of the seeds' estimates; their 95% "
          "intervals come from a two-level bootstrap (seeds with replacement, then each drawn seed's test "
          "examples), so they cover both the training run and the test sample; * marks a pooled interval "
          "that clears zero by more than the largest projection error measured on the compared runs; "
          "(k/S) counts the seeds whose own estimate has the pooled sign.", ""]
    if findings:
        md += [markdown_table([findings_row(f) for f in findings]), ""]
    md += key_figure_markdown(root, roots)
    rows = pooled_rows(findings)
    if rows:
        write_rows_csv(out / "pooled_findings.csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
        md += ["Data: [pooled_findings.csv](pooled_findings.csv); each seed's estimate per test language:", ""]
        for finding in findings:
            md += [f"**{finding.what}**" + (f" ({finding.paper})" if finding.paper else "") + ":", "",
                   markdown_table(pooled_table(finding)), ""]
        notes = [f"{f.key}: {'; '.join(f.notes)}" for f in findings if f.notes]
        if notes:
            md += ["Beware: " + " · ".join(notes), ""]
    dirs = {seed: path / "full" / "subnetworks" for seed, path in roots.items()}
    if all(any(d.glob("*.json")) for d in dirs.values()):
        loaded = load_seed_masks(dirs)
        write_mask_stability(loaded.masks, loaded.degenerate, out / "mask_stability")
        md += ["", "## Subnetworks across seeds (stability; Table 1 over seeds)", ""]
        if sentence := stability_sentence(root):
            md += [sentence, ""]
        md += ["![mask stability](mask_stability/mask_stability.png)", "",
               "![mask Jaccard matrix](mask_stability/mask_jaccard_matrix.png)", ""]
        table = read_csv(out / "mask_stability" / "mask_stability.csv")
        if 0 < len(table) <= MAX_TABLE_ROWS:
            md += [markdown_table(table), ""]
        md += ["Data: [mask_stability.csv](mask_stability/mask_stability.csv), "
               "[mask_jaccard_matrix.csv](mask_stability/mask_jaccard_matrix.csv), "
               "[mask_stability_summary.json](mask_stability/mask_stability_summary.json)", ""]
    for seed, path in roots.items():
        findings = study_findings(path)
        if findings:
            md += [f"## What seed {seed} found on its own", "", *(f"- {f}" for f in findings), ""]
    return md


def findings_row(f: PooledFinding) -> dict:
    """One pooled finding as a row of the front page's findings table, with one short reading."""
    e, last = f.effect, len(f.effect.groups) - 1
    held = [g for g, m in zip(e.groups[:-1], f.marked[:-1]) if m]
    over = "marked" if f.marked[last] else "not marked"
    reading = (f"holds for {', '.join(held)}" if held else "no language clears zero"
               + (" by more than the projection error" if f.margin else ""))
    return {"comparison": f.what + (f" ({f.paper})" if f.paper else ""),
            "pooled change [95% CI]": f"{e.pooled[last]:+.1f} {f.unit} [{e.low[last]:+.1f}, {e.high[last]:+.1f}]",
            "seeds agreeing": f"{int(e.agree()[last])}/{len(e.seeds)}", "over languages": over,
            "reading": reading + (" (beware: see below)" if f.notes else "")}


def key_figure_markdown(root: Path, roots: dict[int, Path]) -> list[str]:
    if figure := key_figure(root, roots):
        seed = f" (seed {min(roots)})" if len(roots) > 1 else ""
        return [f"![{figure[0]}]({figure[1]})", "", f"*The paper's key figure: {figure[0]}*{seed}.", ""]
    return []


def key_figure(root: Path, roots: dict[int, Path]) -> tuple[str, str] | None:
    """The paper's key figure, Fig 2's change matrix (own subnetwork − full model), from the first seed's
    report: (title, its path from the front page); None when no run drew it."""
    first = roots[min(roots)] if roots else root
    items = first / FULL / "report" / "items.json"
    if not items.is_file():
        return None
    for item in json.loads(items.read_text()):
        if item.get("paper") == "Fig 2" and item.get("png"):
            prefix = f"{first.relative_to(root)}/" if first != root else ""
            return item["title"], f"../{prefix}{FULL}/report/{item['png']}"
    return None


def write_study_report(root: Path) -> Path:
    """Write ``<root>/report/report.md`` and ``report.html``; returns the markdown path.

    With several training seeds the page opens with what held across them; the per-run figures
    below are the first seed's (every seed's reports are linked)."""
    root = Path(root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    roots = seed_roots(root)
    several = len(roots) > 1
    first = roots[min(roots)] if roots else root  # a study of several seeds with one finished: seed<s>/
    runs = _runs(first)
    items, seen = [], set()
    for run in runs:
        for item in json.loads((run / "report" / "items.json").read_text()):
            # an SFT run's report repeats the masks sections of the run whose subnetworks it used: list them once
            digest = _content_digest(run / "report", item)
            key = (item["title"], digest or run.name)  # an item without files is never taken for another's copy
            if key not in seen:
                seen.add(key)
                items.append(item | {"run_dir": run.name})
    items.sort(key=_paper_rank)
    dynamics = [row for run in runs for row in _read_dynamics(run)]
    has_dynamics = plot_dynamics(dynamics, out / "dynamics_across_runs.png")
    prefix = f"{first.relative_to(root)}/" if first != root else ""

    md = [f"# crossling study: {root.name}", ""]
    if sentence := interim_sentence(root):
        md += [f"**{sentence}**", ""]
    findings = pooled_findings(root) if several else None
    if several:
        md += write_seed_pooling(root, out, findings)
    else:
        findings = study_findings(first)
        if findings:
            md += ["## What this study found", "", *(f"- {f}" for f in findings), ""]
            md += key_figure_markdown(root, roots)
    md += counterfactual_section(roots or {0: root}, out / "counterfactual")
    md += detection_section(root, out / "detection_limit")
    shares = [f for f in findings if isinstance(f, PooledFinding) and f.unit == "pp"] if several else None
    md += method_comparison_section(root, out / "attribution_methods", shares)
    _write(out / "summary.txt", study_summary(root, findings))
    md += ["The study's summary as text (what `crossling study` prints at the end): [summary.txt](summary.txt)", ""]
    for seed, path in (roots.items() if several else [(None, first)]):
        label = f"Seed {seed} per-run reports: " if several else "Per-run reports: "
        rel = f"{path.relative_to(root)}/" if path != root else ""
        md += [label + ", ".join(f"[{r.name}](../{rel}{r.name}/report/report.html)" for r in _runs(path)), ""]
    if several:
        md += [f"The sections below are seed {min(roots)}'s runs; the other seeds' are in their reports.", ""]
    if has_dynamics:
        md += ["## Language specialisation over epochs across runs (Figs 10, 17, 18)", "",
               "Mean over test languages of the in-language share of each test example's most positive training "
               "examples, per checkpoint: the fully fine-tuned model, SFT with the language subnetworks, and SFT "
               "with shuffled subnetworks.", "", "![dynamics](dynamics_across_runs.png)", ""]
    for item in items:
        paper = f" ({item['paper']})" if item.get("paper") else ""
        seed_tag = f"seed {min(roots)} " if several else ""
        md += [f"## {item['title']}{paper} · {seed_tag}{item['run_dir']} run", ""]
        where = f"../{prefix}{item['run_dir']}/report"
        if item.get("png"):
            md += [f"![{item['title']}]({where}/{item['png']})", ""]
        elif (item.get("csv") or "").endswith(".csv"):  # a table without a figure: show the table itself
            rows = read_csv(first / item["run_dir"] / "report" / item["csv"])
            if 0 < len(rows) <= MAX_TABLE_ROWS:
                md += [markdown_table(rows), ""]
        if item.get("csv"):
            md += [f"Data: [{item['csv']}]({where}/{item['csv']})", ""]
    path = out / "report.md"
    _write(path, "\n".join(md))
    _write(out / "report.html", _html(root, md))
    return path


def _content_digest(report_dir: Path, item: dict) -> str | None:
    """A hash of the item's figure and data files; None when it has neither."""
    files = [report_dir / name for name in (item.get("png"), item.get("csv")) if name and (report_dir / name).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()


# CommonMark with tables; raw HTML in the text is shown as text, never interpreted
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 16px;line-height:1.45}"
          "pre{background:#f4f4f4;padding:8px;font-size:12px;white-space:pre-wrap}"
          "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
          "img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:2px}")


def _html(root: Path, md: list[str]) -> str:
    """The front page's Markdown rendered by markdown-it (headings, images, links, tables, the summary)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>crossling study {html.escape(root.name)}"
            f"</title><style>{_STYLE}</style></head><body>\n" + _MARKDOWN.render("\n".join(md)) + "</body></html>\n")
