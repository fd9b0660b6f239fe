"""The accuracy table as a grouped bar chart (one group per language, one bar per model)."""

from __future__ import annotations

from pathlib import Path

from .atomic import save_figure


def plot_accuracy_table(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    languages = list(rows)
    columns = list(next(iter(rows.values())))
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(languages), 3.4))
    x = np.arange(len(languages))
    for i, column in enumerate(columns):
        values = [100 * rows[lang][column] for lang in languages]
        bars = ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=column.replace("_", " "))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, languages)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Accuracy per language")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
