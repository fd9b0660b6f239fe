"""The study's closing summary: has the model learned the task, the accuracy table, Table 1,
the main influence matrix, and where the report is. Reads only files the stages wrote."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tabulate import tabulate

from .report.render import format_cell
from .study_findings import study_findings


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
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    value = (data.get("init_args") or data).get("dev_per_language")
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


def study_summary(root: Path) -> str:
    full, sft = root / "full", root / "sft"
    learned, ok = learned_table(full)
    parts = [
        "=" * 72,
        f"crossling study summary — {root}",
        "=" * 72,
        "Full fine-tuning, dev accuracy vs the majority-class rate:",
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
        parts += ["What the study found:", *(f"- {f}" for f in findings), ""]
    report = root / "report" / "report.html"
    parts.append(f"Report: {report if report.exists() else root / 'report' / 'report.md'}")
    return "\n".join(parts)
