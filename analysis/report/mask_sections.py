"""The subnetwork sections: Table 1, head usage per layer, overlaps and similarity of the masks, and
the correlations of the paper's Figs 8, 9, 12-16 and 19.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import plots
from ..contributions import write_rows_csv
from ..correlations import cross_language_points, per_layer_correlations
from ..influence import (
    condition_table,
    kept_indices,
)
from ..mask_stats import head_usage, mask_cosine, mask_cosine_per_layer, overlap_absolute, overlap_percent
from ..masks import MaskError, condition_masks, load_subnetworks, resolve_mask
from .items import Item, Report, Source, slug
from .render import markdown_table, read_csv


def find_subnetworks(dirs: list[Path], languages: list[str]) -> tuple[dict[str, np.ndarray], Path | None]:
    for d in dirs:
        folder = d / "subnetworks"
        if all((folder / f"{lang}.json").is_file() for lang in languages):
            return load_subnetworks(folder, languages), folder
    return {}, None


def mask_sections(rep: Report, sources: list[Source], run_dirs: list[Path], languages: list[str]) -> None:
    try:
        subnets, folder = find_subnetworks(run_dirs, languages)
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
        rows = read_csv(stats_csv)
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
            markdown_table(rows),
        )
    )
    # Fig 12: head usage
    usage = head_usage(subnets, languages)
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
    absolute = overlap_absolute(subnets, languages).astype(np.float64)
    percent = overlap_percent(subnets, languages)
    cosine = mask_cosine(subnets, languages)
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
        cos = mask_cosine(masks, languages)
        ovl = overlap_percent(masks, languages)
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
            key = slug(f"{key_base}_{src.name}")
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
        layers = per_layer_correlations(mask_cosine_per_layer(masks, languages), table.percent["pos"], languages)
        key = slug(f"layer_cosine_vs_positive_{src.name}")
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

