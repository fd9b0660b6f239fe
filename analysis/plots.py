"""Figures of the report: annotated heatmaps, scatter plots with fitted lines, lines over epochs, bars.

Built on ``matplotlib.figure.Figure`` (no pyplot, no GUI backend, no global figure state), so the
report can be produced from a notebook, a test or a headless node alike. Conventions follow the
paper: train language on x, test language on y, one language order everywhere; differences use a
diverging colour map centred on zero, and a cell whose bootstrap CI excludes zero is starred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import save_figure
from .bootstrap import excludes_zero


@dataclass
class Panel:
    """One heatmap.

    Attributes:
        title: panel title.
        matrix: (rows, columns) values; NaN cells are left blank.
        row_labels: y tick labels (test languages, or conditions).
        col_labels: x tick labels (train languages).
        low: optional (rows, columns) lower CI bounds.
        high: optional upper CI bounds.
        diverging: centre the colour map on zero (differences).
        xlabel: x axis label.
        ylabel: y axis label.
        fmt: number format of the annotation.
        margin: a diverging cell is starred when its CI clears zero by more than this.
    """

    title: str
    matrix: np.ndarray
    row_labels: Sequence[str]
    col_labels: Sequence[str]
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    diverging: bool = False
    xlabel: str = "train language"
    ylabel: str = "test language"
    fmt: str = "{:.1f}"
    margin: float = 0.0


def _save(fig: Figure, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _num(fmt: str, value: float) -> str:
    return fmt.format(value + 0.0)  # + 0.0 turns -0.0 into 0.0


def _draw_heatmap(fig: Figure, ax, panel: Panel) -> None:
    m = np.asarray(panel.matrix, dtype=np.float64)
    finite = m[np.isfinite(m)]
    if panel.diverging:
        limit = float(np.abs(finite).max()) if finite.size else 1.0
        limit = limit if limit > 0 else 1.0
        vmin, vmax, cmap = -limit, limit, "RdBu_r"
    else:
        vmin = 0.0 if (finite.size == 0 or finite.min() >= 0) else float(finite.min())
        vmax = float(finite.max()) if finite.size else 1.0
        vmax = vmax if vmax > vmin else vmin + 1.0
        cmap = "Blues"
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(m.shape[1]), labels=list(panel.col_labels))
    ax.set_yticks(range(m.shape[0]), labels=list(panel.row_labels))
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    has_ci = panel.low is not None and panel.high is not None
    star = excludes_zero(panel.low, panel.high, panel.margin) if (has_ci and panel.diverging) else np.zeros(m.shape, bool)
    small = m.shape[0] * m.shape[1] <= 64
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isfinite(m[i, j]):
                continue
            level = (m[i, j] - vmin) / (vmax - vmin)
            dark = abs(level - 0.5) > 0.3 if panel.diverging else level > 0.6
            text = _num(panel.fmt, m[i, j]) + ("*" if star[i, j] else "")
            if has_ci and small and np.isfinite(panel.low[i, j]):
                text += (
                    "\n[" + _num(panel.fmt, panel.low[i, j]) + ", " + _num(panel.fmt, panel.high[i, j]) + "]"
                )
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7 if has_ci else 8,
                color="white" if dark else "black",
            )


def plot_heatmaps(
    path: str | Path, panels: Sequence[Panel], title: str | None = None, note: str | None = None
) -> Path:
    """Side-by-side annotated heatmaps (e.g. positive and negative influence) saved as PNG."""
    cols = len(panels)
    widest = max(np.asarray(p.matrix).shape[1] for p in panels)
    tallest = max(np.asarray(p.matrix).shape[0] for p in panels)
    fig = Figure(figsize=(max(4.2, 1.0 * widest + 1.8) * cols, max(3.2, 0.75 * tallest + 1.6)))
    axes = fig.subplots(1, cols, squeeze=False)[0]
    fig.subplots_adjust(wspace=0.45)
    for k, (ax, panel) in enumerate(zip(axes, panels)):
        _draw_heatmap(fig, ax, panel)
        if (
            k
            and list(panel.row_labels) == list(panels[k - 1].row_labels)
            and panel.ylabel == panels[k - 1].ylabel
        ):
            ax.set_ylabel("")
    if title:
        fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7, ha="left", va="top")
    return _save(fig, path)


def plot_scatter(
    path: str | Path,
    x: Sequence[float],
    y: Sequence[float],
    point_labels: Sequence[str] | None,
    xlabel: str,
    ylabel: str,
    title: str,
    slope: float = float("nan"),
    intercept: float = float("nan"),
    subtitle: str | None = None,
) -> Path:
    """Scatter plot with its least-squares line (when defined) and labelled points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    ax.scatter(x, y, s=22, color="tab:blue", alpha=0.8)
    if point_labels is not None and len(point_labels) <= 40:
        for xi, yi, label in zip(x, y, point_labels):
            ax.annotate(label, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if np.isfinite(slope) and x.size:
        xs = np.linspace(np.nanmin(x), np.nanmax(x), 50)
        ax.plot(xs, slope * xs + intercept, color="tab:red", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


@dataclass
class Series:
    """A line with an optional confidence band."""

    label: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def plot_lines(
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[Series]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    per_row: int = 3,
) -> Path:
    """One panel per (title, series), up to ``per_row`` panels a row; shared y axis, so panels compare directly."""
    count = max(len(panels), 1)
    cols = min(count, per_row)
    rows = -(-count // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    axes = grid.reshape(-1)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (panel_title, series) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for s in series:
            (line,) = ax.plot(s.x, s.y, marker="o", markersize=3, label=s.label)
            if s.low is not None and s.high is not None:
                ax.fill_between(s.x, s.low, s.high, color=line.get_color(), alpha=0.15)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in grid:
        row[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(hspace=0.45)
    return _save(fig, path)


def plot_bars(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    notes: Sequence[str] | None = None,
    xlabel: str = "",
) -> Path:
    """Bar chart (e.g. a correlation per layer), each bar annotated with its note (e.g. a p-value)."""
    values = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2), 3.6))
    ax = fig.subplots()
    shown = np.nan_to_num(values)
    ax.bar(range(len(labels)), shown, color=["tab:blue" if v >= 0 else "tab:red" for v in shown])
    ax.set_xticks(range(len(labels)), labels=list(labels))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    if notes is not None:
        for i, (v, note) in enumerate(zip(shown, notes)):
            ax.text(i, v, note, ha="center", va="bottom" if v >= 0 else "top", fontsize=6)
    return _save(fig, path)


@dataclass
class ForestPanel:
    """One comparison: an estimate with its interval per row (e.g. per attribution method)."""

    title: str
    labels: Sequence[str]
    values: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    marked: Sequence[bool]


def plot_forest(path: str | Path, panels: Sequence[ForestPanel], xlabel: str, title: str = "") -> Path:
    """Estimates with their intervals, one panel per comparison side by side on a shared x axis, one row per
    label; a filled dot is a marked estimate, an open one is not. Zero is drawn: a reader sees at a glance
    which rows keep the sign of the others and which intervals cross zero."""
    n = max(len(panels), 1)
    rows = max((len(p.labels) for p in panels), default=1)
    fig = Figure(figsize=(min(3.2 * n, 16.0), 0.4 * rows + 1.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True))
    for ax, panel in zip(axes, panels):
        y = np.arange(len(panel.labels))[::-1]
        values, low, high = (np.asarray(a, dtype=np.float64) for a in (panel.values, panel.low, panel.high))
        for yi, v, lo, hi, mark in zip(y, values, low, high, panel.marked):
            color = "tab:blue" if v >= 0 else "tab:red"
            ax.plot([lo, hi], [yi, yi], color=color, linewidth=1.6)
            ax.plot([v], [yi], "o", color=color, markerfacecolor=color if mark else "white", markersize=6)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels=list(panel.labels))
        ax.set_ylim(-0.6, rows - 0.4)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
