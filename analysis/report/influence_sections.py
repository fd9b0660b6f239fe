"""The influence sections: absolute language shares, differences between conditions and runs
(paper Figs 2, 4, 5, 11), the focus language's masks (Fig 3), specialisation over checkpoints (Figs 10,
17, 18) and against accuracy (Fig 7).
"""

from __future__ import annotations

import numpy as np

from .. import plots
from ..bootstrap import excludes_zero
from ..contributions import SIGNS, ContributionTable, write_rows_csv
from ..correlations import (
    SpecialisationPoint,
    specialisation_vs_accuracy,
)
from ..influence import (
    InfluenceError,
    check_same_test_split,
    condition_table,
    difference_table,
    kept_indices,
)
from .items import (
    SIGN_NAMES,
    TABLE_COLUMNS,
    Item,
    Report,
    Source,
    heatmap_item,
    paper_abs,
    paper_diff,
    slug,
    table_rows,
)


def absolute(rep: Report, sources: list[Source]) -> None:
    for src in sources:
        kept = kept_indices([src.top])
        table = condition_table(src.top, kept, rep.options, src.condition)
        key = slug(f"contrib_{src.label}_{src.condition}")
        title = f"{src.name}: % of top-{src.top.meta['m']} from each training language"
        sentence = (
            f"Share of each training language among the top-{src.top.meta['m']} most positive and most negative "
            f"training examples of each test language's examples, for condition `{src.condition}` of run `{src.label}` "
            "(test examples this model classifies correctly)."
        )
        rep.items.append(
            heatmap_item(
                rep,
                key,
                title,
                sentence,
                paper_abs(src.kind, src.condition),
                table,
                False,
                {"run": src.label, "condition": src.condition},
            )
        )


def differences(rep: Report, sources: list[Source]) -> dict[tuple[str, str], ContributionTable]:
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
        key = slug(f"diff_{src.label}_{src.condition}_minus_{ref.label}_{ref.condition}")
        title = f"{src.name} − {ref.name}: change in % of top-{src.top.meta['m']}"
        sentence = (
            f"Change (percentage points) in each training language's share of the top-{src.top.meta['m']} when "
            f"`{src.condition}` of `{src.label}` replaces `{ref.condition}` of `{ref.label}`, paired over test "
            "examples both classify correctly; * marks a paired-bootstrap 95% CI that clears zero by more than the "
            "projection error (header)."
        )
        rep.items.append(
            heatmap_item(
                rep,
                key,
                title,
                sentence,
                paper_diff(src.kind, src.condition, cross),
                table,
                True,
                {"run": src.label, "condition": src.condition, "reference": ref.name},
            )
        )
    return out


def focus_language(
    rep: Report, sources: list[Source], diffs: dict[tuple[str, str], ContributionTable]
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
        key = slug(f"focus_{lang}_{label}")
        title = f"{label}: test language {lang}, masks vs full model"
        png = plots.plot_heatmaps(rep.path(key, "png"), panels, title, rep.marked_note())
        csv_path = write_rows_csv(rep.path(key, "csv"), csv_rows, ["run", "condition", *TABLE_COLUMNS, "marked"])
        sentence = (
            f"For {lang} test examples only: change in each training language's share when the test example is run "
            f"under its own, random (shuffled) or another language's mask instead of the full model, in `{label}`."
        )
        rep.items.append(
            Item(key, title, sentence, "Fig 3" if rows[0][0].kind == "full" else "", png, csv_path)
        )


def dynamics(rep: Report, sources: list[Source]) -> dict[str, list[SpecialisationPoint]]:
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
            matrix_rows += table_rows(table, {"run": src.label, "condition": src.condition, "epoch": epoch})
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
        # a line needs two checkpoints: with one (the demo sketches the last only) the table says it all
        lines = any(len(series.x) > 1 for _, panel in panels for series in panel)
        png = plots.plot_lines(
            rep.path(key, "png"),
            panels,
            "epoch (checkpoint)",
            "in-language % of positive top-m",
            "Language specialisation per checkpoint",
        ) if lines else None
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
            rep.path("dynamics_matrices", "csv"), matrix_rows, ["run", "condition", "epoch", *TABLE_COLUMNS]
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


def specialisation_accuracy(rep: Report, points_by_source: dict[str, list[SpecialisationPoint]]) -> None:
    for name, points in points_by_source.items():
        if len(points) < 3 or not all(np.isfinite(p.accuracy) for p in points):
            continue
        corr = specialisation_vs_accuracy(points)
        key = slug(f"specialisation_vs_accuracy_{name}")
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

