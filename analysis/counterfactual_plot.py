"""Figures of the counterfactual check: predicted vs retrained change of test loss (one point per test ×
training language, with both intervals), and the matrices side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .counterfactual import CONTROL, CounterfactualMatrix
from .plots import Panel, _save, plot_heatmaps
from .seed_pooling import ALL

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def refit_band(noise_floor: Mapping[str, float] | None) -> float | None:
    """The half-width of the figure's noise lines: the largest change of any test language's mean loss among
    the refits with nothing removed (None without refits)."""
    values = [v for v in (noise_floor or {}).values() if np.isfinite(v)]
    return float(max(values)) if values else None


def plot_predicted_vs_retrained(path: str | Path, matrix: CounterfactualMatrix, title: str,
                                noise_floor: Mapping[str, float] | None = None) -> Path:
    """Scatter of TracIn's predicted against the retrained change of each test language's mean loss when a
    training language is left out; own-language cells are filled, others hollow; the grey band is the
    random control's retrained change (its pooled interval over all test languages); dashed lines: the
    largest change a refit with nothing removed made (retraining's own noise), when refits were run."""
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    left_out = [r for r in matrix.removed if r != CONTROL]
    _, c_low, c_high = matrix.cell("retrained", ALL, CONTROL)
    if np.isfinite(c_low) and np.isfinite(c_high):
        ax.axhspan(c_low, c_high, color="0.85", zorder=0, label="random control (retrained)")
    band = refit_band(noise_floor)
    if band is not None:
        for sign in (1, -1):
            ax.axhline(sign * band, color="0.3", lw=0.9, ls="--", zorder=1,
                       label="largest refit change (nothing removed)" if sign == 1 else None)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.axvline(0, color="0.5", lw=0.6)
    labelled = next((r for r in left_out if r not in matrix.not_learned), left_out[0])  # the legend's marker
    for i, test_lang in enumerate(matrix.languages):
        colour = COLOURS[i % len(COLOURS)]
        for removed in left_out:
            x, x_low, x_high = matrix.cell("predicted", test_lang, removed)
            y, y_low, y_high = matrix.cell("retrained", test_lang, removed)
            own = removed == test_lang
            failed = removed in matrix.not_learned
            ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]],
                        fmt="x" if failed else "o", ms=7 if own else 5, color=colour, alpha=0.35 if failed else 1.0,
                        mfc=colour if own else "white", mew=1.2, elinewidth=0.8, capsize=2,
                        label=f"test {test_lang}" if removed == labelled else None, zorder=3)
            ax.annotate(removed + (" (fit did not learn)" if failed and i == 0 else ""), (x, y), xytext=(4, 3),
                        textcoords="offset points", fontsize=7, color=colour)
    ax.set_xlabel("TracIn's predicted change of mean test loss (first order)")
    ax.set_ylabel("retrained change of mean test loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    note = ("each point: test language (colour) × training language left out (label); filled: its own language; "
            "bars: 95 % intervals")
    if matrix.not_learned:
        note += (f"\nfaint crosses: fits that did not beat the majority class ({', '.join(matrix.not_learned)}), "
                 "kept out of the agreement numbers")
    fig.text(0.01, -0.01, note, fontsize=7, ha="left", va="top")
    return _save(fig, path)


def plot_counterfactual_matrices(path: str | Path, matrix: CounterfactualMatrix) -> Path:
    """Retrained change, its excess over the random control, and TracIn's prediction, as heatmaps
    (rows: test language, columns: training language left out; ×1000 for legibility)."""
    left_out = [r for r in matrix.removed if r != CONTROL]
    panels = []
    for quantity, title in (("retrained", "retrained Δ loss ×1000"), ("excess", "beyond random control ×1000"),
                            ("predicted", "TracIn predicted Δ loss ×1000")):
        grid = np.array([[matrix.cell(quantity, t, r) for r in left_out] for t in matrix.languages]) * 1000
        panels.append(Panel(title, grid[..., 0], matrix.languages, left_out, low=grid[..., 1], high=grid[..., 2],
                            diverging=True, xlabel="training language left out", fmt="{:.1f}"))
    return plot_heatmaps(path, panels, note="a star: the cell's 95 % interval excludes zero")
