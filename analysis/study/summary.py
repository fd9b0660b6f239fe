"""The study's closing summary: has the model learned the task, the accuracy table, Table 1,
the main influence matrix, and where the report is. Reads only files the stages wrote."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tabulate import tabulate

from ..layout import config_value, read_run_config
from ..report.render import format_cell
from .findings import study_findings
from .pooled import (
    PooledFinding,
    describe,
    pooled_accuracy,
    pooled_influence,
    pooled_table,
    seed_progress,
    seed_roots,
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_metrics(run: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every metric starting with ``prefix`` in a run's metrics.csv."""
    values: dict[str, float] = {}
    for row in _read_csv(run / "logs" / "metrics.csv"):
        for key, value in row.items():
            if key.startswith(prefix) and value not in ("", None):
                values[key] = float(value)
    return values


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` observed on ``n`` examples."""
    if n <= 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def dev_examples_per_language(run: Path) -> int | None:
    """``data.init_args.dev_per_language`` from the run's config.yaml (None when unknown or 'all')."""
    value = config_value(read_run_config(run), "data", "dev_per_language")
    return int(value) if isinstance(value, int) else None


def learned_table(run: Path) -> tuple[str, bool]:
    """Dev accuracy (with a 95 % interval) vs the majority-class rate per language, and whether every
    language beats it."""
    metrics = last_metrics(run, "val/")
    langs = sorted(k.removeprefix("val/acc_") for k in metrics if k.startswith("val/acc_"))
    n = dev_examples_per_language(run)
    lines = [f"language  dev acc  95% interval (n={n or '?'})  majority  learned"]
    ok = True
    for lang in langs:
        acc, majority = metrics[f"val/acc_{lang}"], metrics.get(f"val/majority_{lang}", float("nan"))
        low, high = wilson_interval(acc, n) if n else (float("nan"), float("nan"))
        beats = acc > majority
        ok &= beats
        verdict = ("yes" if low > majority else "yes (interval reaches the majority rate)") if beats else "NO"
        lines.append(f"{lang:8s}  {100 * acc:6.1f}%  {100 * low:5.1f}% - {100 * high:5.1f}%        "
                     f"{100 * majority:7.1f}%  {verdict}")
    return "\n".join(lines), ok and bool(langs)


def _table(rows: list[dict[str, str]], columns: list[str] | None = None) -> str:
    if not rows:
        return "  (not available)"
    columns = columns or list(rows[0])
    body = [[format_cell(r.get(c, "")) for c in columns] for r in rows]
    return tabulate(body, headers=columns, tablefmt="plain", disable_numparse=True)


def influence_matrix(path: Path, sign: str = "pos") -> str:
    rows = [r for r in _read_csv(path) if r.get("sign") == sign]
    if not rows:
        return "  (not available)"
    tests = list(dict.fromkeys(r["test_lang"] for r in rows))
    trains = list(dict.fromkeys(r["train_lang"] for r in rows))
    cell = {(r["test_lang"], r["train_lang"]): float(r["percent"]) for r in rows}
    lines = ["test\\train " + " ".join(f"{t:>6s}" for t in trains)]
    for test in tests:
        lines.append(f"{test:10s} " + " ".join(f"{cell.get((test, t), float('nan')):6.1f}" for t in trains))
    return "\n".join(lines)


def seed_summary(root: Path, heading: str = "") -> list[str]:
    """One training seed's runs (or a one-seed study): learned?, accuracy, Table 1, the main matrix, findings."""
    full, sft = root / "full", root / "sft"
    learned, ok = learned_table(full)
    parts = [
        f"Full fine-tuning{heading}, dev accuracy vs the majority-class rate:",
        learned,
        "" if ok else "WARNING: the model does not beat the majority class in every language; "
        "influence rankings would mostly reflect labels, not languages.",
        "Accuracy (test): full model, subnetworks after full FT, subnetworks after SFT:",
        _table(_read_csv(sft / "accuracy" / "accuracy.csv")),
        "",
        "Table 1 — disabled heads per language:",
        _table(_read_csv(full / "subnetworks" / "stats" / "table1_disabled_heads.csv")),
        "",
        "Positive influence, full model, own subnetworks (% of top-m from each training language):",
        influence_matrix(full / "influence" / "own" / "contributions.csv"),
        "",
    ]
    findings = study_findings(root)
    if findings:
        parts += [f"What this seed found{heading}:" if heading else "What the study found:",
                  *(f"- {f}" for f in findings), ""]
    return parts


def interim_sentence(root: Path) -> str | None:
    """"Seed 1 of 3 so far" while a study of several seeds runs; None once every planned seed finished."""
    progress = seed_progress(root)
    if progress is None:
        return None
    finished, planned = progress
    if set(planned) <= set(finished):
        return None
    return (f"Interim: seed {len(finished)} of {len(planned)} so far (finished: {', '.join(map(str, finished))}; "
            f"still running: {', '.join(str(s) for s in planned if s not in finished)}). This page is written again "
            "as each seed finishes; the findings below pool the finished seeds only.")


def pooled_findings(root: Path) -> list[PooledFinding]:
    """The pooled answer of every question the seeds' files answer (empty for a one-seed study)."""
    if len(seed_roots(root)) < 2:
        return []
    return pooled_influence(root) + pooled_accuracy(root)


def stability_sentence(root: Path) -> str | None:
    """The subnetworks' stability across seeds in one sentence (from the front page's summary JSON)."""
    import json

    path = root / "report" / "mask_stability" / "mask_stability_summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return (f"Subnetworks across seeds: a language's masks from two seeds overlap with Jaccard {s['j_same']:.2f} "
            f"(enabled heads), masks of different languages from different seeds {s['j_other']:.2f}, of different "
            f"languages within a seed {s['j_within']:.2f}; random masks of the same sparsity "
            f"{s['random_jaccard']:.2f}. Same-language pairs minus other-language pairs: {s['difference']:+.3f} "
            f"(permutation p = {s['permutation_p']:.3f}, language labels shuffled within seeds).")


def counterfactual_sentence(root: Path) -> str | None:
    """The counterfactual check's sentence as the study report wrote it (pooled over the seeds that ran it)."""
    path = Path(root) / "report" / "counterfactual" / "counterfactual.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["sentence"]
    except (OSError, ValueError, KeyError):
        return None


def study_summary(root: Path, findings: list[PooledFinding] | None = None) -> str:
    """The study's summary; ``findings`` are the pooled findings when the caller has them already (they
    cost a bootstrap over every seed's test examples)."""
    root = Path(root)
    roots = seed_roots(root)
    parts = ["=" * 72, f"crossling study summary — {root}", "=" * 72]
    if sentence := interim_sentence(root):
        parts += [sentence, ""]
    if len(roots) < 2:
        only = roots[min(roots)] if roots else root
        parts += seed_summary(only, f" (seed {min(roots)})" if only != root else "")
    else:
        parts += [f"Training seeds: {', '.join(map(str, roots))} (the same data sample; each seed its own "
                  "fine-tuning, subnetworks, SFT and analyses).", "",
                  "What held across seeds (pooled: two-level bootstrap over seeds, then test examples; * = the "
                  "pooled interval clears zero by more than the projection error):"]
        for finding in pooled_findings(root) if findings is None else findings:
            parts += [f"- {describe(finding)}", _table(pooled_table(finding)), ""]
        if sentence := stability_sentence(root):
            parts.append(f"- {sentence}")
        parts.append("")
        for seed, path in roots.items():
            parts += ["-" * 72, f"Seed {seed} ({path})", "-" * 72, *seed_summary(path, f" (seed {seed})")]
    if sentence := counterfactual_sentence(root):
        parts += [f"- {sentence}", ""]
    report = root / "report" / "report.html"
    parts.append(f"Report: {report if report.exists() else root / 'report' / 'report.md'}")
    return "\n".join(parts)
