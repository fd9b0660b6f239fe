"""The subnetworks' stability across seeds as files: ``mask_stability.csv`` (per language),
``mask_jaccard_matrix.csv``, ``mask_stability_summary.json`` and two figures, each written atomically;
the numbers come from ``mask_stability``. Figures are drawn on a ``matplotlib.figure.Figure`` (no pyplot
state) and saved through the one atomic saver, as every other figure of the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..atomic import save_figure, write_json_atomic
from ..mask_stats import write_csv
from .mask_stability import (
    PERMUTATIONS,
    RANDOM_DRAWS,
    LanguageStability,
    SeedMasks,
    _check_degenerate,
    _need_two_languages,
    check_seed_masks,
    disabled_heads_over_seeds,
    jaccard_matrix,
    language_stability,
    modularity,
    permutation_test,
)

CSV_HEADER = [
    "language",
    "n_seeds",
    "jaccard_across_seeds",
    "random_jaccard",
    "random_jaccard_low",
    "random_jaccard_high",
    "jaccard_to_other_languages",
    "disabled_in_every_seed",
    "disabled_in_no_seed",
    "enabled_heads_min",
    "enabled_heads_max",
    "disabled_min",
    "disabled_max",
    "disabled_mean",
    "degenerate_seeds",
]


def _plot_bars(
    stability: dict[str, LanguageStability],
    degenerate_seeds: dict[str, int],
    n_seeds: int,
    chance: float,
    path: Path,
) -> Path:
    languages = list(stability)
    x = np.arange(len(languages))
    width = 0.27
    fig = Figure(figsize=(max(5.5, 0.9 * len(languages) + 2.5), 4.6))
    ax = fig.subplots()
    across = [stability[g].jaccard_across_seeds for g in languages]
    other = [stability[g].jaccard_to_other_languages for g in languages]
    rand = [stability[g].random_jaccard for g in languages]
    bars = ax.bar(x - width, across, width, label="same language, other seeds", color="tab:blue")
    ax.bar(x, other, width, label="other languages, other seeds", color="tab:orange")
    err = np.array([[r.mean - r.low for r in rand], [r.high - r.mean for r in rand]]).clip(min=0)
    ax.bar(
        x + width,
        [r.mean for r in rand],
        width,
        yerr=err,
        capsize=3,
        label="random masks, same sizes (95 %)",
        color="tab:gray",
    )
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance level (all languages)")
    handles, names = ax.get_legend_handles_labels()
    if any(degenerate_seeds.values()):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        names.append("† / hatched: some seeds' masks degenerate")
    ax.legend(handles, names, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    for bar, lang in zip(bars, languages):  # after the legend, so its handle keeps the plain colour
        if degenerate_seeds[lang]:
            bar.set_hatch("//")
            bar.set_edgecolor("black")
    labels = [f"{g}†" if degenerate_seeds[g] else g for g in languages]
    ax.set_xticks(x, labels=labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean Jaccard of enabled heads")
    ax.set_title(f"subnetwork stability across {n_seeds} training seeds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _plot_matrix(
    matrix: np.ndarray,
    labels: list[tuple[str, int]],
    flags: dict[int, dict[str, bool]],
    n_seeds: int,
    path: Path,
) -> Path:
    ticks = [f"{lang}/s{seed}" + ("†" if flags[seed][lang] else "") for lang, seed in labels]
    m = len(ticks)
    side = max(4.5, 0.32 * m + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
    ax.set_xticks(range(m), labels=ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(m), labels=ticks, fontsize=7)
    for edge in range(n_seeds, m, n_seeds):
        ax.axhline(edge - 0.5, color="white", linewidth=1.2)
        ax.axvline(edge - 0.5, color="white", linewidth=1.2)
    if m <= 24:
        for i in range(m):
            for j in range(m):
                v = matrix[i, j]
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if v > 0.5 else "white",
                )
    title = "Jaccard of enabled heads between (language, seed) masks"
    if any(f for per in flags.values() for f in per.values()):
        title += "\n† degenerate mask"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _json_number(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


def write_mask_stability(
    masks: SeedMasks,
    degenerate: dict[int, dict[str, bool]] | None,
    out_dir: Path,
    draws: int = RANDOM_DRAWS,
    n_permutations: int = PERMUTATIONS,
) -> dict[str, Path]:
    """Write the stability tables and figures into ``out_dir``; returns name -> path.

    ``mask_stability.csv`` (per language), ``mask_stability_summary.json`` (the modularity
    numbers and permutation p), ``mask_jaccard_matrix.csv``, ``mask_stability.png`` and
    ``mask_jaccard_matrix.png``. Every file is written to a temporary name and renamed.
    Degenerate masks (``degenerate``: seed -> language -> bool, missing = False) are counted
    in the CSV and JSON and marked in both figures.
    """
    seeds, languages, shape = check_seed_masks(masks)
    _need_two_languages(languages)
    flags = _check_degenerate(degenerate, seeds, languages)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    stability = language_stability(masks, draws)
    table = {row["language"]: row for row in disabled_heads_over_seeds(masks, flags)}
    mod = modularity(masks)
    perm = permutation_test(masks, n_permutations)
    matrix, labels = jaccard_matrix(masks)
    chance = float(np.mean([stability[g].random_jaccard.mean for g in languages]))

    rows = []
    for lang in languages:
        st, t1 = stability[lang], table[lang]
        rows.append(
            [
                lang,
                len(seeds),
                st.jaccard_across_seeds,
                st.random_jaccard.mean,
                st.random_jaccard.low,
                st.random_jaccard.high,
                st.jaccard_to_other_languages,
                int(st.disabled_in_every_seed.sum()),
                int(st.disabled_in_no_seed.sum()),
                min(st.enabled_heads),
                max(st.enabled_heads),
                t1["disabled_min"],
                t1["disabled_max"],
                t1["disabled_mean"],
                t1["degenerate_seeds"],
            ]
        )
    files: dict[str, Path] = {}
    files["csv"] = write_csv(out_dir / "mask_stability.csv", CSV_HEADER, rows)
    ticks = [f"{lang}/s{seed}" for lang, seed in labels]
    files["matrix_csv"] = write_csv(
        out_dir / "mask_jaccard_matrix.csv",
        ["mask", *ticks],
        [[tick, *matrix[i].tolist()] for i, tick in enumerate(ticks)],
    )
    summary = {
        "j_same": _json_number(mod.j_same),
        "j_other": _json_number(mod.j_other),
        "j_within": _json_number(mod.j_within),
        "difference": _json_number(mod.difference),
        "random_jaccard": _json_number(chance),
        "permutation_p": perm.p_value,
        "n_permutations": perm.n_permutations,
        "permutation_exact": perm.exact,
        "random_draws": draws,
        "n_seeds": len(seeds),
        "seeds": seeds,
        "languages": languages,
        "mask_shape": list(shape),
        "degenerate_masks": sum(f for per in flags.values() for f in per.values()),
    }
    files["summary"] = write_json_atomic(out_dir / "mask_stability_summary.json", summary)
    degenerate_seeds = {lang: table[lang]["degenerate_seeds"] for lang in languages}
    files["bars_png"] = _plot_bars(
        stability, degenerate_seeds, len(seeds), chance, out_dir / "mask_stability.png"
    )
    files["matrix_png"] = _plot_matrix(matrix, labels, flags, len(seeds), out_dir / "mask_jaccard_matrix.png")
    return files
